#!/usr/bin/env python3
"""LoRA training throughput and peak memory: `backprop train` against PyTorch + PEFT
on the same model, the same token ids and the same batches, measured in the same run.

    python benches/train_vs_peft.py [--steps 30] [--repeats 3]
    python benches/train_vs_peft.py --long-context 4096 --gradient-checkpointing --steps 5 --repeats 1

(scripts/bench.sh runs it with the project venv.) Both sides train the small qwen2
fixture (~24M parameters, f32, CPU) with LoRA r16/alpha32, dropout 0, on the 7
projections, batch 4, AdamW(0.9, 0.999, 1e-8, wd 0.01), cosine schedule with 2 warmup
steps, grad clip 1.0, on assets/samples/messages.jsonl.

- Ours: `backprop train --json` in its own process. Step times come from the Step
  events' `elapsed_s`, token counts from the run's metrics.jsonl.
- Peer: this script again with `--peer`, in its own process: transformers +
  peft, `torch.set_num_threads(os.cpu_count())`, fed the token ids that
  `backprop data check --json` prints, in the batches our trainer draws (its seeded
  shuffle is reproduced below and checked against our per-step token counts).

Throughput = unpadded tokens of steps 3..S / wall time of steps 3..S (steps 1-2 are
warmup). Peak RSS = ru_maxrss of that one child process (os.wait4). Each side runs
`--repeats` times, alternating; the table shows medians. It is printed and written
to $CARGO_TARGET_DIR/bench/train_vs_peft.md (default ~/.cache/backpropagate/target).

`--precision bf16` runs ours with `--precision bf16` (bf16 products on CPUs with
AVX512-BF16) and the peer under `torch.autocast("cpu", dtype=torch.bfloat16)` (what
HF Trainer's `bf16=True` does on the CPU); `--peer-precision f32` keeps the peer in f32
against a bf16 run of ours.

`--long-context N` trains on generated text samples of about N tokens each (the
sample texts concatenated), one per step unless `--batch` says otherwise, with
max_seq_len N; `--gradient-checkpointing` turns it on for both sides (ours
`--gradient-checkpointing on`, the peer `gradient_checkpointing_enable()`).

Imports: stdlib only in the driver; torch/transformers/peft in the peer process.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "assets", "samples", "messages.jsonl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 4
LORA_R, LORA_ALPHA = 16, 32
LR, WARMUP, SEED, CLIP, WD = 2e-4, 2, 42, 1.0, 0.01
WARMUP_STEPS_SKIPPED = 2


# --- our data order, reproduced ------------------------------------------------------
# `backprop train` (val_ratio 0) keeps the usable samples in the order of a seeded
# shuffle (data::split) and then draws them in a second seeded shuffle per epoch
# (train::batch::DataOrder), both rand 0.8 `SliceRandom::shuffle` with
# `ChaCha8Rng::seed_from_u64`. Reproduced here so that the peer sees the same batches;
# main() checks the result against the token counts our run logs.

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _pcg32_seed(state):
    """rand_core 0.6 `SeedableRng::seed_from_u64`: 32 seed bytes from PCG32."""
    out = b""
    for _ in range(8):
        state = (state * 6364136223846793005 + 11634580027462260723) & _M64
        xs = (((state >> 18) ^ state) >> 27) & _M32
        rot = state >> 59
        out += (((xs >> rot) | (xs << ((32 - rot) & 31))) & _M32).to_bytes(4, "little")
    return out


class _ChaCha8:
    """rand_chacha 0.3 ChaCha8Rng (64-bit block counter, stream 0), next_u32 only."""

    def __init__(self, seed_u64):
        key = _pcg32_seed(seed_u64 & _M64)
        self.key = [int.from_bytes(key[i:i + 4], "little") for i in range(0, 32, 4)]
        self.counter = 0
        self.buf = []

    def _block(self):
        c = self.counter
        s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574] + self.key + [c & _M32, c >> 32, 0, 0]
        x = list(s)

        def qr(a, b, cc, d):
            x[a] = (x[a] + x[b]) & _M32
            x[d] ^= x[a]
            x[d] = ((x[d] << 16) | (x[d] >> 16)) & _M32
            x[cc] = (x[cc] + x[d]) & _M32
            x[b] ^= x[cc]
            x[b] = ((x[b] << 12) | (x[b] >> 20)) & _M32
            x[a] = (x[a] + x[b]) & _M32
            x[d] ^= x[a]
            x[d] = ((x[d] << 8) | (x[d] >> 24)) & _M32
            x[cc] = (x[cc] + x[d]) & _M32
            x[b] ^= x[cc]
            x[b] = ((x[b] << 7) | (x[b] >> 25)) & _M32

        for _ in range(4):  # 8 rounds
            qr(0, 4, 8, 12), qr(1, 5, 9, 13), qr(2, 6, 10, 14), qr(3, 7, 11, 15)
            qr(0, 5, 10, 15), qr(1, 6, 11, 12), qr(2, 7, 8, 13), qr(3, 4, 9, 14)
        self.counter += 1
        self.buf = [(x[i] + s[i]) & _M32 for i in range(16)]
        self.buf.reverse()

    def next_u32(self):
        if not self.buf:
            self._block()
        return self.buf.pop()


def _gen_index(rng, n):
    """rand 0.8 `gen_range(0..n)` for u32: widening multiply with rejection zone."""
    zone = ((n << (32 - n.bit_length())) & _M32) - 1
    while True:
        t = rng.next_u32() * n
        if t & _M32 <= zone:
            return t >> 32


def _shuffle(n, seed):
    rng = _ChaCha8(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _gen_index(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def our_batches(samples, steps, batch, seed):
    """The rows `backprop train` uses at each step (no packing, val_ratio 0)."""
    usable = [s for s in samples if any(l != -100 for l in s["labels"][1:])]
    rows = [usable[i] for i in _shuffle(len(usable), seed)]
    out, epoch, pos = [], 0, 0
    order = _shuffle(len(rows), seed ^ (0x9E3779B97F4A7C15 & _M64))
    for _ in range(steps):
        b = []
        while len(b) < batch:
            if pos >= len(rows):
                epoch, pos = epoch + 1, 0
                order = _shuffle(len(rows), seed ^ (((epoch + 1) * 0x9E3779B97F4A7C15) & _M64))
            b.append(rows[order[pos]])
            pos += 1
        out.append(b)
    return out


# --- measuring one child process -----------------------------------------------------


def run_measured(cmd, out_path, env=None):
    """Runs cmd alone, stdout to out_path; returns (exit code, peak RSS MiB, cpu s, wall s).

    os.wait4 reports the rusage of exactly this child (and any children it reaped),
    not of earlier siblings as RUSAGE_CHILDREN would accumulate."""
    t = time.perf_counter()
    with open(out_path, "wb") as out, open(out_path + ".err", "wb") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    rss_kib = ru.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return p.returncode, rss_kib / 1024, ru.ru_utime + ru.ru_stime, wall


def busy_cpu_s():
    """CPU seconds the whole machine has spent busy since boot (Linux; else None)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def check_ok(code, out_path, what):
    if code != 0:
        with open(out_path + ".err", encoding="utf-8", errors="replace") as f:
            err = f.read()[-4000:]
        sys.exit(f"{what} failed (exit {code}):\n{err}")


def throughput(steps):
    """steps: [(tokens, elapsed_s, loss)] in order. Tokens/s over steps 3..S."""
    k = WARMUP_STEPS_SKIPPED
    tokens = sum(s[0] for s in steps[k:])
    return tokens / (steps[-1][1] - steps[k - 1][1]), tokens


def run_ours(bin_, model, steps, work, i, opts):
    runs_dir = os.path.join(work, f"runs-{i}")
    out = os.path.join(work, f"ours-{i}.jsonl")
    cmd = [bin_, "train", "--model", model, "--data", opts.data, "--steps", str(steps),
           "--max-seq-len", str(opts.max_seq_len),
           "--gradient-checkpointing", "on" if opts.gradient_checkpointing else "off",
           "--precision", opts.precision,
           "--batch-size", str(BATCH), "--grad-accum", "1", "--lr", str(LR),
           "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--lora-dropout", "0",
           "--warmup", str(WARMUP), "--seed", str(SEED), "--runs-dir", runs_dir, "--json",
           # no mid-run checkpoints inside the timed steps (the peer saves none); the
           # final one is written after the last step's time is taken
           "--checkpoint-every", "0"]
    code, rss, cpu, wall = run_measured(cmd, out)
    check_ok(code, out, "backprop train")
    events = [json.loads(l) for l in open(out, encoding="utf-8") if l.startswith("{")]
    step_ev = [e for e in events if e.get("type") == "Step"]
    summary = next(e for e in events if e.get("type") == "Summary")["summary"]
    metrics = os.path.join(summary["run_dir"], "metrics.jsonl")
    if not os.path.isabs(metrics):
        metrics = os.path.join(os.getcwd(), metrics)
    tokens = {}
    for line in open(metrics, encoding="utf-8"):
        m = json.loads(line)
        if m.get("tokens") is not None:
            tokens[m["step"]] = m["tokens"]
    rows = [(tokens[e["step"]], e["elapsed_s"], e["loss"]) for e in step_ev]
    if len(rows) != steps:
        sys.exit(f"backprop train logged {len(rows)} steps, expected {steps}")
    shutil.rmtree(runs_dir, ignore_errors=True)
    return rows, rss, cpu, wall, {"trainable": summary.get("trainable_params")}


def run_peer(model, batches_path, steps, work, i, opts):
    out = os.path.join(work, f"peer-{i}.jsonl")
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", "--model", model,
           "--batches", batches_path, "--steps", str(steps)]
    if opts.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    cmd += ["--peer-precision", opts.peer_precision]
    code, rss, cpu, wall = run_measured(cmd, out)
    check_ok(code, out, "PyTorch + PEFT peer")
    lines = [json.loads(l) for l in open(out, encoding="utf-8") if l.startswith("{")]
    info = next(l for l in lines if l.get("type") == "info")
    rows = [(l["tokens"], l["elapsed_s"], l["loss"]) for l in lines if l.get("type") == "step"]
    return rows, rss, cpu, wall, info


# --- the peer process ------------------------------------------------------------------


def peer_main(args):
    import resource

    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(SEED)
    with open(args.batches, encoding="utf-8") as f:
        batches = json.load(f)[: args.steps]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no requires_grad hook under PEFT.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
        bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, args.steps)
    print(json.dumps({
        "type": "info", "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "attn": getattr(model.config, "_attn_implementation", "?"),
        "precision": "bf16 autocast" if args.peer_precision == "bf16" else "f32",
        "trainable": sum(p.numel() for p in params),
        "setup_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (1024 * 1024 if sys.platform == "darwin" else 1024),
    }), flush=True)
    start = time.perf_counter()
    for step, rows in enumerate(batches, 1):
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), t), dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        labels = torch.full((len(rows), t), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.peer_precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        print(json.dumps({
            "type": "step", "step": step, "loss": loss,
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "elapsed_s": time.perf_counter() - start,
        }), flush=True)


# --- driver --------------------------------------------------------------------------


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/backpropagate/target")
    return os.environ.get("BACKPROP_BIN") or os.path.join(target, "release", "backprop")


def default_out():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/backpropagate/target")
    return os.path.join(target, "bench", "train_vs_peft.md")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; medians reported (default 3)")
    ap.add_argument("--out", default=default_out(), help="Markdown report path")
    ap.add_argument("--real-model", help="train this model folder instead of the small fixture "
                    "(scripts/real-model.sh installs SmolLM2-135M-Instruct)")
    ap.add_argument("--plot", help="also draw both sides' loss curves into this PNG")
    ap.add_argument("--batch", type=int, help="rows per step (default 4; 1 with --long-context)")
    ap.add_argument("--long-context", type=int, metavar="TOKENS",
                    help="train on generated samples of about TOKENS tokens (max_seq_len TOKENS)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="gradient checkpointing on both sides")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="ours --precision (default f32); the peer's too unless --peer-precision")
    ap.add_argument("--peer-precision", choices=["f32", "bf16"],
                    help="the peer's precision (bf16: torch.autocast on the CPU)")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.peer_precision = args.peer_precision or args.precision
    if args.peer:
        return peer_main(args)
    global BATCH
    BATCH = args.batch or (1 if args.long_context else BATCH)
    args.max_seq_len = args.long_context or 2048
    args.data = DATA
    if args.steps <= WARMUP_STEPS_SKIPPED:
        ap.error(f"--steps must be more than {WARMUP_STEPS_SKIPPED} (the untimed warmup steps)")

    bin_ = default_bin()
    if not os.access(bin_, os.X_OK):
        sys.exit(f"no backprop binary at {bin_}: build it (cargo build --release -p backprop-cli) "
                 "or set BACKPROP_BIN")
    version = subprocess.run([bin_, "--version"], capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="bp-train-vs-peft-")
    try:
        if args.real_model:
            model = os.path.abspath(args.real_model)
        else:
            model = os.path.join(work, "model")
            subprocess.run([bin_, "fixture", model, "--family", "qwen2", "--size", "small"],
                           check=True, stdout=subprocess.DEVNULL)
        if args.long_context:
            args.data = os.path.join(work, "long.jsonl")
            write_long_samples(args.data, args.long_context, args.steps * BATCH)
        check = subprocess.run([bin_, "data", "check", args.data, "--model", model, "--json",
                                "--max-seq-len", str(args.max_seq_len),
                                "--show", "100000"], check=True, capture_output=True, text=True)
        samples = json.loads(check.stdout)["samples"]
        batches = our_batches(samples, args.steps, BATCH, SEED)
        batches_path = os.path.join(work, "batches.json")
        with open(batches_path, "w", encoding="utf-8") as f:
            json.dump([[{"input_ids": r["input_ids"], "labels": r["labels"]} for r in b]
                       for b in batches], f)
        expected_tokens = [sum(len(r["input_ids"]) for r in b) for b in batches]

        results = {"ours": [], "peer": []}
        busy0, t0 = busy_cpu_s(), time.perf_counter()
        info, ours_info = {}, {}
        for i in range(args.repeats):
            for side in ("ours", "peer"):
                print(f"[{i + 1}/{args.repeats}] {side} ...", file=sys.stderr, flush=True)
                if side == "ours":
                    r = run_ours(bin_, model, args.steps, work, i, args)
                    ours_info = r[4]
                else:
                    r = run_peer(model, batches_path, args.steps, work, i, args)
                    info = r[4]
                rows, rss, cpu, wall = r[:4]
                tps, tok = throughput(rows)
                timed = rows[-1][1] - rows[WARMUP_STEPS_SKIPPED - 1][1]
                results[side].append({
                    "tps": tps, "rss": rss, "cpu": cpu, "wall": wall, "tokens": tok,
                    "timed_s": timed, "startup_s": rows[0][1],
                    "step_tokens": [x[0] for x in rows], "losses": [x[2] for x in rows],
                })
                print(f"    {tps:.0f} tokens/s, {rss:.0f} MiB peak RSS, "
                      f"loss {rows[0][2]:.4f} -> {rows[-1][2]:.4f}, "
                      f"{cpu / wall:.2f} cores busy on average", file=sys.stderr, flush=True)
        busy1, t1 = busy_cpu_s(), time.perf_counter()
        children_cpu = sum(r["cpu"] for side in ("ours", "peer") for r in results[side])
        results["others"] = (None if busy0 is None or busy1 is None
                             else (max(0.0, busy1 - busy0 - children_cpu), t1 - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    info["ours_trainable"] = ours_info.get("trainable")
    report = render(args, results, info, version, expected_tokens)
    if args.plot:
        plot_losses(results, args.plot, args.real_model)
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(report)
    print(f"written to {args.out}", file=sys.stderr)


def write_long_samples(path, tokens, count):
    """`count` text samples of a little over `tokens` tokens each (about 3.5 characters
    per token), made of the sample conversations' texts in turn; the trainer cuts them
    to max_seq_len."""
    texts = []
    for line in open(DATA, encoding="utf-8"):
        texts += [m["content"] for m in json.loads(line)["messages"]]
    with open(path, "w", encoding="utf-8") as out:
        k = 0
        for _ in range(count):
            parts, size = [], 0
            while size < tokens * 4:
                parts.append(texts[k % len(texts)])
                size += len(parts[-1]) + 2
                k += 1
            out.write(json.dumps({"text": "\n\n".join(parts)}) + "\n")


def plot_losses(results, path, real_model):
    """Every run's loss per step, both sides on one chart: the curves should overlap at
    step 1 and fall alike (LoRA A inits differ, so later steps drift a little)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    # The peer wide and pale underneath, ours dashed on top: where they agree (they
    # should, step for step at first) both stay visible.
    for side, name, color, width, style in (("peer", "PyTorch + PEFT", "#e07a16", 4, "-"),
                                            ("ours", "backprop", "#5b5bf7", 1.6, "--")):
        for i, r in enumerate(results[side]):
            steps = list(range(1, len(r["losses"]) + 1))
            ax.plot(steps, r["losses"], color=color, alpha=(0.55 if side == "peer" else 0.95) * (1 if i == 0 else 0.5),
                    label=name if i == 0 else None, linewidth=width, linestyle=style)
    title = os.path.basename(os.path.normpath(real_model)) if real_model else "qwen2 small fixture"
    ax.set_title(f"LoRA training loss, same batches: {title}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    print(f"loss curves drawn to {path}", file=sys.stderr)


def other_note(others, ncpu):
    if others is None:
        return "CPU used by other processes during the runs: unknown (no /proc/stat)."
    cpu, wall = others
    return (f"CPU used by other processes during the runs: {cpu:.0f} s in {wall:.0f} s "
            f"({100 * cpu / (wall * ncpu):.0f}% of the machine, this driver included). "
            "Anything above a few % skews the numbers.")


def render(args, results, info, version, expected_tokens):
    med = lambda side, k: statistics.median(r[k] for r in results[side])
    first = lambda side: statistics.median(r["losses"][0] for r in results[side])
    last = lambda side: statistics.median(r["losses"][-1] for r in results[side])
    o_tps, p_tps = med("ours", "tps"), med("peer", "tps")
    o_rss, p_rss = med("ours", "rss"), med("peer", "rss")
    same_batches = all(r["step_tokens"] == expected_tokens for s in ("ours", "peer")
                       for r in results[s])
    ncpu = os.cpu_count()
    lines = [
        "# LoRA training: backprop vs PyTorch + PEFT (CPU)",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {platform.machine()} · "
        f"{ncpu} logical cores · {version} · torch {info.get('torch')} "
        f"({info.get('threads')} intra-op threads, {info.get('interop_threads')} inter-op), "
        f"transformers {info.get('transformers')} (attn {info.get('attn')}), peft {info.get('peft')}",
        "",
        f"{'model ' + os.path.basename(os.path.normpath(args.real_model)) if args.real_model else 'qwen2 `small` fixture (f32)'}, "
        f"{'generated text samples of ' + str(args.long_context) + ' tokens' if args.long_context else os.path.relpath(DATA, ROOT)}, "
        f"gradient checkpointing {'on (both sides)' if args.gradient_checkpointing else 'off'}, "
        f"precision: ours {args.precision}, peer {info.get('precision')}, {args.steps} steps × batch "
        f"{BATCH} (right-padded), LoRA r{LORA_R}/α{LORA_ALPHA} dropout 0 on 7 projections, "
        f"AdamW lr {LR:g} wd {WD}, cosine, warmup {WARMUP}, clip {CLIP}. Tokens/s = unpadded "
        f"tokens of steps {WARMUP_STEPS_SKIPPED + 1}..{args.steps} "
        f"({results['ours'][0]['tokens']} tokens) / their wall time; "
        f"medians of {args.repeats} runs per side, alternating. "
        f"Same batches on both sides: {'yes' if same_batches else 'NO (our data order was not reproduced)'}.",
        "",
        "Legitimate differences in how the two sides compute the same step: ours runs the "
        "layers on the batch's real tokens only (padding-free; the peer computes the padded "
        "batch, as `Trainer` does without packing), and the LM head and loss only on rows that "
        "carry a target (the peer computes logits for every position); ours keeps the "
        "checkpoint's bf16 linears in bf16 and widens them per product (exact). "
        + ("Both are f32 arithmetic on the CPU with the same optimizer and schedule."
           if args.precision == "f32" and args.peer_precision == "f32" else
           "bf16: ours rounds the operands of the products with frozen weights and the LM head "
           "to bf16 (f32 sums; activations, LoRA, attention and the optimizer f32); the peer's "
           "autocast runs every linear (LoRA ones included) and matmul in bf16."),
        "",
        "| | tokens/s | peak RSS (MiB) | loss step 1 | loss step "
        f"{args.steps} | cores busy | step 1 (s) | process wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, name in (("ours", "ours (backprop)"), ("peer", "PyTorch + PEFT")):
        lines.append(
            f"| {name} | {med(side, 'tps'):.0f} | {med(side, 'rss'):.0f} | {first(side):.4f} | "
            f"{last(side):.4f} | {statistics.median(r['cpu'] / r['wall'] for r in results[side]):.2f} | "
            f"{med(side, 'startup_s'):.2f} | {med(side, 'wall'):.1f} |")
    lines += [
        f"| **ours / peer** | **{o_tps / p_tps:.2f}×** | **{o_rss / p_rss:.2f}×** | | | | | |",
        "",
        "Per run (tokens/s, MiB): "
        + "; ".join(f"{n}: " + ", ".join(f"{r['tps']:.0f}/{r['rss']:.0f}" for r in results[s])
                    for s, n in (("ours", "ours"), ("peer", "peer"))),
        "",
        f"The peer's peak RSS before its first step (Python, torch/transformers/peft imports, "
        f"model, LoRA, optimizer): {info.get('setup_rss_mib', 0):.0f} MiB. Trainable parameters: "
        f"ours {info.get('ours_trainable')}, peer {info.get('trainable')}.",
        "",
        other_note(results["others"], ncpu),
        "",
        "Tokens/s ratio > 1: ours faster. RSS ratio < 1: ours smaller. Step-1 losses should "
        "agree closely (same base model and batch; LoRA B starts at zero on both sides); "
        "later ones drift because the LoRA A init differs. `cores busy` = (user + sys CPU "
        "time) / wall time of the whole process (model load and setup included). `step 1` = "
        "first step's time (first-touch costs; not counted in tokens/s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
