"""Shared fixtures: the `backprop` binary under test and fixture models it writes."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "assets" / "samples"


@pytest.fixture(scope="session")
def backprop():
    path = os.environ.get("BACKPROP_BIN")
    if not path or not pathlib.Path(path).is_file():
        pytest.fail("set BACKPROP_BIN to the built `backprop` binary (scripts/test.sh does)")

    def run(*args, check=True):
        proc = subprocess.run([path, *map(str, args)], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"backprop {' '.join(map(str, args))} failed:\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def model_dir(request, backprop, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fixture-{request.param}")
    backprop("fixture", out, "--family", request.param)
    return out


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3", "mistral"])
def any_family_dir(request, backprop, tmp_path_factory):
    """Every model family the engine supports, for numeric reference checks."""
    out = tmp_path_factory.mktemp(f"family-{request.param}")
    backprop("fixture", out, "--family", request.param)
    return out


def data_report(backprop, data, model):
    proc = backprop("data", "check", data, "--model", model, "--json", "--show", "100000")
    return json.loads(proc.stdout)


def our_logits(backprop, model, adapter, ids, tmp_path):
    """Our logits (seq, vocab) for one row of token ids, via `backprop debug probe`."""
    from safetensors.torch import load_file
    batch = tmp_path / "probe-batch.json"
    batch.write_text(json.dumps({"input_ids": [ids], "labels": [ids]}))
    out = tmp_path / "probe-out.safetensors"
    backprop("debug", "probe", "--model", model, "--adapter", adapter, "--batch", batch, "--out", out)
    return load_file(out)["logits"][0]
