"""GGUF quantization: our exporter against llama.cpp's quantizer, measured in the same run.

Ours: `backprop export RUN --format gguf --quant Q` — reads the safetensors base,
merges the LoRA, permutes, quantizes and writes the GGUF. Peer: llama.cpp's
`llama_model_quantize` (what `llama-quantize` runs) from an f32 GGUF of the same merged
weights, which it only has to quantize. Reports the median wall time and peak RSS of
each (separate processes, `/usr/bin/time -v`), their ratios, and the largest tensor
(the memory target is peak RSS ≤ 2× the largest tensor).

Usage: python benches/gguf_vs_llama_quantize.py [--size small|medium] [--repeats 3]
"""

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/backpropagate/target"))
BIN = os.environ.get("BACKPROP_BIN", str(TARGET / "release/backprop"))

PEER = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3]); p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def timed(cmd):
    out = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    return seconds, rss, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=["small", "medium"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quants", default="q8_0,q4_k_m")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    model = tmp / "model"
    subprocess.run([BIN, "fixture", model, "--family", "llama", "--size", args.size], check=True, capture_output=True)
    runs = tmp / "runs"
    subprocess.run([BIN, "train", "--model", model, "--data", ROOT / "assets/samples/prompt_completion.jsonl",
                    "--steps", "1", "--batch-size", "1", "--max-seq-len", "64", "--runs-dir", runs, "--json"],
                   check=True, capture_output=True)
    (run,) = list(runs.iterdir())

    def export(quant):
        _, _, out = timed([BIN, "export", run, "--format", "gguf", "--quant", quant])
        return next(pathlib.Path(out.strip()).glob("*.gguf"))

    f32 = export("f32")
    sys.path.insert(0, str(ROOT / "tests/python"))
    from gguf import GGUFReader
    largest = max(int(t.n_elements) for t in GGUFReader(f32).tensors) * 4 / 2**20
    params = sum(int(t.n_elements) for t in GGUFReader(f32).tensors)
    baseline = timed([sys.executable, "-c", "import llama_cpp"])[1]

    rows = []
    for quant in args.quants.split(","):
        ours = [timed([BIN, "export", run, "--format", "gguf", "--quant", quant])[:2] for _ in range(args.repeats)]
        peer = [timed([sys.executable, "-c", PEER, f32, tmp / f"peer-{quant}.gguf", FTYPES[quant]])[:2]
                for _ in range(args.repeats)]
        med = lambda xs, i: statistics.median(x[i] for x in xs)
        rows.append((quant, med(ours, 0), med(ours, 1), med(peer, 0), med(peer, 1)))

    lines = [
        f"GGUF export vs llama.cpp quantizer — {args.size} llama fixture, {params/1e6:.0f}M parameters, "
        f"largest tensor {largest:.0f} MiB (f32), {os.cpu_count()} cores, median of {args.repeats}",
        "",
        "| quant | ours (s) | llama.cpp (s) | time ratio | ours peak RSS (MiB) | llama.cpp peak RSS (MiB) | ours RSS / largest tensor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for q, ot, orss, pt, prss in rows:
        lines.append(f"| {q} | {ot:.2f} | {pt:.2f} | {ot/pt:.2f}× | {orss:.0f} | {prss:.0f} | {orss/largest:.2f}× |")
    lines += ["", f"llama.cpp's figures include its Python process (`import llama_cpp` alone: {baseline:.0f} MiB). "
              "Ours includes reading safetensors, merging the LoRA and permuting; llama.cpp starts from an f32 GGUF "
              "of the merged weights. Time ratio < 1: ours faster."]
    report = "\n".join(lines)
    print(report)
    out = TARGET / "bench" / "gguf_vs_llama_quantize.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
