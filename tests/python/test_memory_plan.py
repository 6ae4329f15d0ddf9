"""The trainer's memory plan (crates/backpropagate/src/gpu/memory.rs, `estimate_fused`)
against the peak RSS it really reaches on the CPU, for the `small` fixture and for the
real SmolLM2-135M when installed: within ±20 %, at batch 4 of one short sample, and at
2048 tokens with every layer checkpointed. Every row of the data is the same sample, so
every micro-batch is as long as the plan assumes."""
import json

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
REAL = pathlib.Path(os.environ.get("BACKPROP_REAL_MODEL", "/nonexistent"))
# Runs argv[1:], passing its stdout through, then prints its own peak RSS (KiB).
MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
sys.stdout.flush()
print(f"peak-rss-kib {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def long_sample(tmp_path, chars):
    """One text sample of the sample conversations' texts, `chars` characters long."""
    texts = [m["content"] for l in (ROOT / "assets" / "samples" / "messages.jsonl")
             .read_text().splitlines() for m in json.loads(l)["messages"]]
    text, k = "", 0
    while len(text) < chars:
        text += texts[k % len(texts)] + "\n\n"
        k += 1
    data = tmp_path / "long.jsonl"
    data.write_text((json.dumps({"text": text}) + "\n") * 4)
    return data


def plan_and_peak(model, tmp_path, data=None, micro=4, extra=()):
    if data is None:
        line = (ROOT / "assets" / "samples" / "messages.jsonl").read_text().splitlines()[0]
        data = tmp_path / "same.jsonl"
        data.write_text((line + "\n") * 16)
    out = tmp_path / "out.jsonl"
    cmd = [os.environ["BACKPROP_BIN"], "train", "--model", str(model), "--data", str(data),
           "--steps", "2", "--batch-size", str(micro), "--grad-accum", "1",
           "--checkpoint-every", "0", "--runs-dir", str(tmp_path / "runs"), "--json", *extra]
    # A child forked from this (large: torch is loaded) process starts with a copy of
    # its memory map, whose size Linux folds into the child's peak RSS at exec. So the
    # trainer is started and measured by a small fresh Python instead.
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], stdout=f,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    m = re.search(rf"memory plan: about (\d+) MiB at micro-batch {micro}", text)
    assert m, "the trainer logs no memory plan"
    peak_kib = int(re.search(r"^peak-rss-kib (\d+)$", text, re.M).group(1))
    return int(m.group(1)), peak_kib / 1024


def check(model, tmp_path, **kw):
    planned, peak = plan_and_peak(model, tmp_path, **kw)
    assert 0.8 <= peak / planned <= 1.2, f"planned {planned} MiB, peak RSS {peak:.0f} MiB"


def check_checkpointed(model, tmp_path):
    """2048 tokens in one row, every layer recomputed in backward."""
    data = long_sample(tmp_path, 2048 * 5)
    check(model, tmp_path, data=data, micro=1,
          extra=("--max-seq-len", "2048", "--gradient-checkpointing", "on"))


def test_the_plan_matches_the_peak_on_the_small_fixture(backprop, tmp_path):
    backprop("fixture", tmp_path / "model", "--size", "small")
    check(tmp_path / "model", tmp_path)


@pytest.mark.skipif(not (REAL / "model.safetensors").is_file(),
                    reason="the real model is not installed (bash scripts/real-model.sh)")
def test_the_plan_matches_the_peak_on_smollm2(backprop, tmp_path):
    check(REAL, tmp_path)


def test_the_checkpointed_plan_matches_the_peak_on_the_small_fixture(backprop, tmp_path):
    backprop("fixture", tmp_path / "model", "--size", "small")
    check_checkpointed(tmp_path / "model", tmp_path)


@pytest.mark.skipif(not (REAL / "model.safetensors").is_file(),
                    reason="the real model is not installed (bash scripts/real-model.sh)")
def test_the_checkpointed_plan_matches_the_peak_on_smollm2(backprop, tmp_path):
    check_checkpointed(REAL, tmp_path)
