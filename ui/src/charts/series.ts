// Columnar chart data for a training run: steps on x, loss / eval loss / learning rate /
// tokens per second on y, filled from a run's saved metrics and then from streamed
// `Step`/`Eval` events; and a rolling window of `Gpu` samples. Plain arrays, because
// uPlot draws `null` as a gap (eval loss exists only every `eval_every` steps). Pure TS:
// no DOM, no Svelte, so it is unit-tested on its own.

import type { Event } from '../generated/Event';
import type { MetricLine } from '../generated/MetricLine';

export type Y = number | null;
type StepEvent = Extract<Event, { type: 'Step' }>;
type EvalEvent = Extract<Event, { type: 'Eval' }>;
type GpuEvent = Extract<Event, { type: 'Gpu' }>;

/** Values for one step; `undefined` leaves what is already there. */
interface Point {
  loss?: Y;
  evalLoss?: Y;
  lr?: Y;
  tokensPerS?: Y;
  gradNorm?: Y;
}

const present = (v: number | null | undefined): v is number => typeof v === 'number' && Number.isFinite(v);

export class TrainSeries {
  step: number[] = [];
  loss: Y[] = [];
  evalLoss: Y[] = [];
  lr: Y[] = [];
  tokensPerS: Y[] = [];
  gradNorm: Y[] = [];
  /** Steps kept are multiples of `stride` (plus eval points and the newest step). */
  stride = 1;
  /** Bumped on every change; charts redraw when it moves. */
  version = 0;

  /** @param cap most rows kept; beyond it every other step is dropped and `stride` doubles. */
  constructor(readonly cap = 5000) {}

  get length(): number {
    return this.step.length;
  }

  get lastStep(): number | null {
    return this.step.length ? this.step[this.step.length - 1] : null;
  }

  /** Number of real (non-null) training loss points. */
  get lossPoints(): number {
    let n = 0;
    for (const v of this.loss) if (v !== null) n++;
    return n;
  }

  /** Empties the series, for a new run. */
  reset(): void {
    this.step = [];
    this.loss = [];
    this.evalLoss = [];
    this.lr = [];
    this.tokensPerS = [];
    this.gradNorm = [];
    this.stride = 1;
    this.version++;
  }

  /** Drops the steps after `step` (all of them for 0): where a resumed run starts again. */
  keepUpTo(step: number): void {
    if (this.lastStep === null || this.lastStep <= step) return;
    this.truncateFrom(step + 1);
    this.version++;
  }

  /** Merges saved metrics (`get_run`), one line per step and possibly one per evaluation. */
  mergeMetrics(lines: readonly MetricLine[]): void {
    for (const m of lines) {
      // Lines omit absent values (serde skip_serializing_if), so `undefined` means "not on this line".
      this.upsert(m.step, {
        loss: present(m.loss) ? m.loss : undefined,
        evalLoss: present(m.eval_loss) ? m.eval_loss : undefined,
        lr: present(m.lr) ? m.lr : undefined,
        tokensPerS: present(m.tokens_per_s) ? m.tokens_per_s : undefined,
        gradNorm: present(m.grad_norm) ? m.grad_norm : undefined,
      });
    }
    this.compact();
    this.version++;
  }

  /**
   * Applies one engine event; returns whether the series changed. A `Step` below the
   * newest one means a resume from an earlier checkpoint: the steps after it are
   * discarded, as the engine discards them from metrics.jsonl.
   */
  apply(e: Event): boolean {
    if (e.type === 'Step') return this.applyStep(e), true;
    if (e.type === 'Eval') return this.applyEval(e), true;
    return false;
  }

  applyStep(e: Pick<StepEvent, 'step' | 'loss' | 'lr' | 'tokens_per_s' | 'grad_norm'>): void {
    const last = this.lastStep;
    if (last !== null && e.step < last) this.truncateFrom(e.step);
    this.dropTransientLast(e.step);
    this.upsert(e.step, {
      loss: present(e.loss) ? e.loss : null,
      lr: present(e.lr) ? e.lr : null,
      tokensPerS: present(e.tokens_per_s) ? e.tokens_per_s : null,
      gradNorm: present(e.grad_norm) ? e.grad_norm : null,
    });
    this.compact();
    this.version++;
  }

  applyEval(e: Pick<EvalEvent, 'step' | 'loss'>): void {
    this.upsert(e.step, { evalLoss: present(e.loss) ? e.loss : null });
    this.compact();
    this.version++;
  }

  /** uPlot data for the loss chart: [step, loss, eval loss]. */
  lossData(): [number[], Y[], Y[]] {
    return [this.step, this.loss, this.evalLoss];
  }

  lrData(): [number[], Y[]] {
    return [this.step, this.lr];
  }

  throughputData(): [number[], Y[]] {
    return [this.step, this.tokensPerS];
  }

  /** Index of the first row with step >= `step` (binary search; steps are sorted). */
  private lowerBound(step: number): number {
    let lo = 0;
    let hi = this.step.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.step[mid] < step) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private upsert(step: number, p: Point): void {
    const i = this.lowerBound(step);
    if (this.step[i] !== step) {
      this.step.splice(i, 0, step);
      this.loss.splice(i, 0, null);
      this.evalLoss.splice(i, 0, null);
      this.lr.splice(i, 0, null);
      this.tokensPerS.splice(i, 0, null);
      this.gradNorm.splice(i, 0, null);
    }
    if (p.loss !== undefined) this.loss[i] = p.loss;
    if (p.evalLoss !== undefined) this.evalLoss[i] = p.evalLoss;
    if (p.lr !== undefined) this.lr[i] = p.lr;
    if (p.tokensPerS !== undefined) this.tokensPerS[i] = p.tokensPerS;
    if (p.gradNorm !== undefined) this.gradNorm[i] = p.gradNorm;
  }

  private truncateFrom(step: number): void {
    const i = this.lowerBound(step);
    for (const col of this.columns()) col.length = i;
  }

  /**
   * Once thinned (stride > 1), the newest step is shown even when it is not a multiple of
   * the stride; it is dropped again when the next step arrives, unless it carries an eval.
   */
  private dropTransientLast(next: number): void {
    const n = this.step.length;
    if (this.stride === 1 || n === 0) return;
    const s = this.step[n - 1];
    if (s !== next && s % this.stride !== 0 && this.evalLoss[n - 1] === null) {
      for (const col of this.columns()) col.length = n - 1;
    }
  }

  private compact(): void {
    while (this.step.length > this.cap) {
      this.stride *= 2;
      const last = this.step.length - 1;
      const keep: number[] = [];
      for (let i = 0; i <= last; i++) {
        if (this.step[i] % this.stride === 0 || this.evalLoss[i] !== null || i === last) keep.push(i);
      }
      const pick = <T>(col: T[]) => keep.map((i) => col[i]);
      this.step = pick(this.step);
      this.loss = pick(this.loss);
      this.evalLoss = pick(this.evalLoss);
      this.lr = pick(this.lr);
      this.tokensPerS = pick(this.tokensPerS);
      this.gradNorm = pick(this.gradNorm);
    }
  }

  private columns(): Y[][] {
    return [this.step, this.loss, this.evalLoss, this.lr, this.tokensPerS, this.gradNorm];
  }
}

/** A rolling window of GPU samples (`Gpu` events arrive about once a second, with no job). */
export class GpuSeries {
  /** Unix seconds. */
  t: number[] = [];
  usedMb: number[] = [];
  totalMb: number[] = [];
  tempC: number[] = [];
  util: number[] = [];
  version = 0;
  last: GpuEvent | null = null;

  constructor(readonly cap = 600) {}

  get length(): number {
    return this.t.length;
  }

  apply(e: Event, nowS: number = Date.now() / 1000): boolean {
    if (e.type !== 'Gpu') return false;
    this.t.push(nowS);
    this.usedMb.push(e.used_mb);
    this.totalMb.push(e.total_mb);
    this.tempC.push(e.temp_c);
    this.util.push(e.util);
    this.last = e;
    const extra = this.t.length - this.cap;
    if (extra > 0) {
      for (const col of [this.t, this.usedMb, this.totalMb, this.tempC, this.util]) col.splice(0, extra);
    }
    this.version++;
    return true;
  }

  /** uPlot data: [time, used MB, total MB, temperature °C]. */
  data(): [number[], number[], number[], number[]] {
    return [this.t, this.usedMb, this.totalMb, this.tempC];
  }
}

/** A run's curve for the comparison chart. */
export interface Curve {
  step: readonly number[];
  y: readonly Y[];
}

/**
 * Aligns curves that have different steps onto one x axis (the union of their steps),
 * with `null` where a curve has no value, as uPlot wants: [x, y1, y2, ...].
 */
export function alignCurves(curves: readonly Curve[]): [number[], ...Y[][]] {
  const xs = new Set<number>();
  for (const c of curves) for (const s of c.step) xs.add(s);
  const x = [...xs].sort((a, b) => a - b);
  const at = new Map(x.map((s, i) => [s, i]));
  const ys = curves.map((c) => {
    const y: Y[] = new Array<Y>(x.length).fill(null);
    c.step.forEach((s, i) => {
      const v = c.y[i];
      y[at.get(s)!] = v ?? null;
    });
    return y;
  });
  return [x, ...ys];
}

/** Training loss of saved metrics as a curve (eval-only lines skipped). */
export function lossCurve(lines: readonly MetricLine[]): Curve {
  const s = new TrainSeries(Number.MAX_SAFE_INTEGER);
  s.mergeMetrics(lines.filter((m) => present(m.loss)));
  return { step: s.step, y: s.loss };
}
