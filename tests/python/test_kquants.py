"""Our k-quant GGUF exports against llama.cpp's own quantizer (llama_model_quantize,
what `llama-quantize` runs): the same tensor types for every preset's mixture, and
byte-identical blocks, on models wide enough for 256-value k-quant blocks."""

import ctypes
import pathlib

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader

from conftest import SAMPLES

PRESETS = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
           "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
           "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def small_run(request, backprop, tmp_path_factory):
    """A run on a ~30M-parameter fixture (hidden 512, ffn 1408: q/k/v/o/gate/up fit
    256-blocks, ffn_down's 1408 columns do not, so fallbacks are exercised too)."""
    root = tmp_path_factory.mktemp(f"small-{request.param}")
    model = root / "model"
    backprop("fixture", model, "--family", request.param, "--size", "small")
    runs = root / "runs"
    backprop("train", "--model", model, "--data", SAMPLES / "prompt_completion.jsonl", "--steps", "1",
             "--lr", "5e-2", "--warmup", "0", "--batch-size", "2", "--runs-dir", runs)
    (run,) = list(runs.iterdir())
    return runs, run, export(backprop, runs, run, "f32")


def export(backprop, runs, run, quant):
    out = backprop("export", run.name, "--format", "gguf", "--quant", quant, "--runs-dir", runs).stdout.strip()
    (f,) = pathlib.Path(out).glob("*.gguf")
    return f


@pytest.mark.parametrize("preset", list(PRESETS))
def test_same_types_and_bytes_as_llama_quantize(backprop, small_run, preset, tmp_path):
    runs, run, f32 = small_run
    ours = export(backprop, runs, run, preset)
    reference = tmp_path / f"reference-{preset}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(reference).encode(), ctypes.byref(params)) == 0
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    theirs = {t.name: t for t in GGUFReader(reference).tensors}
    assert mine.keys() == theirs.keys()
    types = {}
    for name, t in theirs.items():
        m = mine[name]
        assert m.tensor_type == t.tensor_type, f"{preset} {name}: ours {m.tensor_type.name}, llama.cpp {t.tensor_type.name}"
        assert np.asarray(m.data).tobytes() == np.asarray(t.data).tobytes(), f"{preset} {name} ({t.tensor_type.name}) bytes differ"
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"{preset}: identical to llama.cpp; tensor types {types}")
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=32, logits_all=True, verbose=False, n_threads=2)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.asarray(llm.scores[:4])).all(), f"llama.cpp runs our {preset} file"
