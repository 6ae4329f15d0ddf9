import { describe, expect, it } from 'vitest';
import { alignCurves, GpuSeries, lossCurve, TrainSeries } from '../src/charts/series';
import type { MetricLine } from '../src/generated/MetricLine';

const step = (s: number, loss = 10 - s / 10) => ({
  type: 'Step' as const,
  run: 0,
  step: s,
  loss,
  lr: 2e-4,
  grad_norm: 1,
  tokens_per_s: 100 + s,
  elapsed_s: s,
  eta_s: 100 - s,
});

/** Metric lines as the server sends them: absent values are missing keys, not nulls. */
const metric = (m: Record<string, number>) => m as unknown as MetricLine;

describe('TrainSeries', () => {
  it('appends steps as columns and leaves eval gaps as null', () => {
    const s = new TrainSeries();
    s.apply(step(1, 3.0));
    s.apply(step(2, 2.5));
    s.apply({ type: 'Eval', step: 2, loss: 2.7 });
    s.apply(step(3, 2.0));
    expect(s.step).toEqual([1, 2, 3]);
    expect(s.loss).toEqual([3.0, 2.5, 2.0]);
    expect(s.evalLoss).toEqual([null, 2.7, null]);
    expect(s.tokensPerS).toEqual([101, 102, 103]);
    expect(s.lossPoints).toBe(3);
    const [x, loss, ev] = s.lossData();
    expect(x).toBe(s.step);
    expect(loss).toBe(s.loss);
    expect(ev).toBe(s.evalLoss);
  });

  it('ignores events that are not Step or Eval', () => {
    const s = new TrainSeries();
    const v = s.version;
    expect(s.apply({ type: 'Log', level: 'info', message: 'hi' })).toBe(false);
    expect(s.apply({ type: 'Checkpoint', step: 5, path: '/x' })).toBe(false);
    expect(s.version).toBe(v);
    expect(s.length).toBe(0);
  });

  it('inserts an eval at a step it has not seen, in step order', () => {
    const s = new TrainSeries();
    s.apply(step(1));
    s.apply(step(4));
    s.apply({ type: 'Eval', step: 3, loss: 1.5 });
    expect(s.step).toEqual([1, 3, 4]);
    expect(s.loss[1]).toBeNull();
    expect(s.evalLoss).toEqual([null, 1.5, null]);
    expect(s.lossPoints).toBe(2);
  });

  it('starts from saved metrics and continues with streamed events without duplicates', () => {
    const s = new TrainSeries();
    s.mergeMetrics([
      metric({ step: 1, loss: 3, lr: 1e-4, tokens_per_s: 50 }),
      metric({ step: 2, loss: 2.8, lr: 2e-4, tokens_per_s: 51 }),
      metric({ step: 2, eval_loss: 2.9 }),
      metric({ step: 3, loss: 2.6, lr: 2e-4 }),
    ]);
    expect(s.step).toEqual([1, 2, 3]);
    expect(s.loss).toEqual([3, 2.8, 2.6]);
    expect(s.evalLoss).toEqual([null, 2.9, null]);
    expect(s.tokensPerS).toEqual([50, 51, null]);
    // The stream repeats step 3 (sent while the metrics loaded), then moves on.
    s.apply(step(3, 2.6));
    s.apply(step(4, 2.4));
    expect(s.step).toEqual([1, 2, 3, 4]);
    expect(s.loss).toEqual([3, 2.8, 2.6, 2.4]);
    expect(s.evalLoss[1]).toBe(2.9);
  });

  it('drops the steps after an earlier checkpoint when a resumed run goes back', () => {
    const s = new TrainSeries();
    for (let i = 1; i <= 12; i++) s.apply(step(i, 5));
    s.apply({ type: 'Eval', step: 12, loss: 4 });
    s.apply(step(11, 1.0));
    expect(s.step).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    expect(s.loss.at(-1)).toBe(1.0);
    expect(s.evalLoss.every((v) => v === null)).toBe(true);
  });

  it('thins to multiples of a doubling stride past the cap, keeping evals and the newest step', () => {
    const s = new TrainSeries(100);
    for (let i = 1; i <= 1000; i++) {
      s.apply(step(i));
      if (i % 250 === 0 || i === 333) s.apply({ type: 'Eval', step: i, loss: 1 });
    }
    expect(s.length).toBeLessThanOrEqual(100);
    expect(s.length).toBeGreaterThan(50);
    expect(s.stride).toBe(16);
    expect(s.lastStep).toBe(1000);
    for (const st of s.step) {
      const isEval = st % 250 === 0 || st === 333;
      expect(st % s.stride === 0 || isEval || st === 1000).toBe(true);
    }
    expect(s.step).toContain(333);
    expect(s.evalLoss.filter((v) => v !== null)).toHaveLength(5);
    // Columns stay aligned.
    for (const col of [s.loss, s.evalLoss, s.lr, s.tokensPerS, s.gradNorm]) expect(col).toHaveLength(s.length);
    const i = s.step.indexOf(512);
    expect(s.tokensPerS[i]).toBe(612);
  });

  it('shows a newest step off the stride only until the next one arrives', () => {
    const s = new TrainSeries(8);
    for (let i = 1; i <= 9; i++) s.apply(step(i));
    expect(s.stride).toBe(2);
    expect(s.lastStep).toBe(9);
    s.apply(step(10));
    expect(s.step).not.toContain(9);
    expect(s.lastStep).toBe(10);
  });

  it('keeps the steps up to a resumed checkpoint', () => {
    const s = new TrainSeries();
    for (let i = 1; i <= 8; i++) s.apply(step(i));
    s.apply({ type: 'Eval', step: 8, loss: 1 });
    const v = s.version;
    s.keepUpTo(5);
    expect(s.step).toEqual([1, 2, 3, 4, 5]);
    expect(s.evalLoss).toEqual([null, null, null, null, null]);
    expect(s.version).toBeGreaterThan(v);
    s.keepUpTo(9);
    expect(s.length).toBe(5);
    s.keepUpTo(0);
    expect(s.length).toBe(0);
  });

  it('resets for a new run', () => {
    const s = new TrainSeries(4);
    for (let i = 1; i <= 10; i++) s.apply(step(i));
    const v = s.version;
    s.reset();
    expect(s.length).toBe(0);
    expect(s.stride).toBe(1);
    expect(s.lastStep).toBeNull();
    expect(s.version).toBeGreaterThan(v);
  });

  it('treats non-finite values as gaps', () => {
    const s = new TrainSeries();
    s.apply(step(1, NaN));
    s.apply(step(2, Infinity));
    s.apply(step(3, 1));
    expect(s.loss).toEqual([null, null, 1]);
    expect(s.lossPoints).toBe(1);
  });
});

describe('GpuSeries', () => {
  it('keeps a rolling window of samples', () => {
    const g = new GpuSeries(3);
    for (let i = 0; i < 5; i++) {
      g.apply({ type: 'Gpu', used_mb: 1000 + i, total_mb: 8000, util: 50, temp_c: 60 + i, power_w: 100 }, 1000 + i);
    }
    expect(g.length).toBe(3);
    expect(g.t).toEqual([1002, 1003, 1004]);
    expect(g.usedMb).toEqual([1002, 1003, 1004]);
    expect(g.tempC).toEqual([62, 63, 64]);
    expect(g.last?.used_mb).toBe(1004);
    const [t, used, total, temp] = g.data();
    expect([t.length, used.length, total.length, temp.length]).toEqual([3, 3, 3, 3]);
    expect(g.apply({ type: 'Eval', step: 1, loss: 1 })).toBe(false);
  });
});

describe('alignCurves', () => {
  it('puts curves with different steps on one x axis with null gaps', () => {
    const [x, a, b] = alignCurves([
      { step: [1, 2, 3], y: [3, 2, 1] },
      { step: [2, 4], y: [5, 4] },
    ]);
    expect(x).toEqual([1, 2, 3, 4]);
    expect(a).toEqual([3, 2, 1, null]);
    expect(b).toEqual([null, 5, null, 4]);
  });

  it('builds a loss curve from metrics, skipping eval-only lines', () => {
    const c = lossCurve([metric({ step: 1, loss: 2 }), metric({ step: 1, eval_loss: 3 }), metric({ step: 2, loss: 1.5 })]);
    expect(c.step).toEqual([1, 2]);
    expect(c.y).toEqual([2, 1.5]);
  });
});
