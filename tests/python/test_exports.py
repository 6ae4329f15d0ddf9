"""Exports of a trained run load in the Python stack with the same numbers: our PEFT
adapter in `peft`, and the merged checkpoint in `transformers`."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import SAMPLES, our_logits


@pytest.fixture(scope="module")
def trained_run(backprop, model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    backprop("train", "--model", model_dir, "--data", SAMPLES / "alpaca.jsonl", "--steps", "4",
             "--lr", "5e-2", "--warmup", "0", "--batch-size", "4", "--runs-dir", runs)
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return model_dir, runs, run


def batch():
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 250, 3, 77, 501]])
    return ids


def hf_logits(model):
    with torch.no_grad():
        return model(batch()).logits[0].float()


def test_adapter_export_loads_in_peft_with_our_logits(backprop, trained_run, tmp_path):
    model_dir, runs, run = trained_run
    out = backprop("export", run.name, "--format", "adapter", "--runs-dir", runs).stdout.strip()
    cfg = json.loads((run / "exports" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ref = hf_logits(peft_model)
    ids = batch()[0].tolist()
    ours = our_logits(backprop, model_dir, out, ids, tmp_path)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"max logit difference {diff}"
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(batch()).logits[0]
    assert (ref - base_logits).abs().max().item() > 1e-2, "training changed the model"


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("f32", torch.float32, 1e-4), ("f16", torch.float16, 2e-2)])
def test_merged_export_matches_base_plus_adapter(backprop, trained_run, dtype, torch_dtype, tol):
    model_dir, runs, run = trained_run
    out = backprop("export", run.name, "--format", "merged", "--dtype", dtype, "--runs-dir", runs).stdout.strip()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch_dtype
    assert json.loads((run / "exports" / f"merged-{dtype}" / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = hf_logits(PeftModel.from_pretrained(base, run / "adapter").eval())
    got = hf_logits(merged.float())
    diff = (got - ref).abs().max().item()
    assert diff < tol, f"{dtype}: max logit difference {diff}"
    assert not list((run / "exports").glob(".tmp-*")), "no temporary folders left"
