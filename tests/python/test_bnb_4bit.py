"""bitsandbytes 4-bit checkpoints (the `*-bnb-4bit` models on the Hub), quantized by
bitsandbytes itself and saved in the layout transformers writes: our loader and
exporter dequantize every weight exactly as `bitsandbytes.functional.dequantize_4bit`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SAMPLES

bnb_functional = pytest.importorskip("bitsandbytes.functional")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_bnb_checkpoint(src, dst, double_quant):
    """Quantizes the fixture's linears with bitsandbytes (NF4, blocks of 64) and saves
    them as transformers does: the packed weight plus `QuantState.as_dict(packed=True)`
    under `<name>.`; everything else in bf16."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": "bfloat16",
    }
    (dst / "config.json").write_text(json.dumps(config))
    out, expected = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        w = w.to(torch.bfloat16)
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, state = bnb_functional.quantize_4bit(
                w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            out[name] = q
            for key, value in state.as_dict(packed=True).items():
                out[f"{name}.{key}"] = value
            expected[name] = bnb_functional.dequantize_4bit(q, state).float()
        else:
            out[name] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return expected


@pytest.mark.parametrize("double_quant", [False, True])
def test_our_dequantization_is_bitsandbytes(backprop, model_dir, tmp_path, double_quant):
    bnb = tmp_path / "bnb"
    expected = write_bnb_checkpoint(model_dir, bnb, double_quant)
    runs = tmp_path / "runs"
    # A learning rate so small that the LoRA delta is far below bf16's resolution: the
    # merged export is then the dequantized base itself.
    proc = backprop("train", "--model", bnb, "--data", SAMPLES / "alpaca.jsonl", "--steps", "1",
                    "--lr", "1e-12", "--batch-size", "2", "--max-seq-len", "64",
                    "--device", "cpu", "--runs-dir", runs, "--json")
    assert "bitsandbytes 4-bit checkpoint" in proc.stdout
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    out = backprop("export", run.name, "--format", "merged", "--dtype", "f32",
                   "--runs-dir", runs).stdout.strip()
    merged = load_file(f"{out}/model.safetensors")
    assert "quantization_config" not in json.loads(open(f"{out}/config.json").read())
    assert set(expected) <= set(merged)
    for name, want in expected.items():
        got = merged[name]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=name)
    # And the companions are not exported as tensors of their own.
    assert not [n for n in merged if "absmax" in n or "quant_state" in n]
