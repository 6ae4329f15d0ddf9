"""GGUF exports, read by llama.cpp's own Python reader (gguf-py) and run by llama.cpp
itself (llama-cpp-python built from source): metadata, tensor names and layouts,
q8_0/f16/bf16 bytes identical to llama.cpp's reference quantizer, the tokenizer
reproducing Hugging Face's ids, logits and greedy generation matching ours."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize
from transformers import AutoTokenizer

from conftest import SAMPLES, our_logits, varied_texts

QUANTS = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
          "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def exported(backprop, any_family_dir, tmp_path_factory):
    model_dir = any_family_dir
    runs = tmp_path_factory.mktemp("runs")
    backprop("train", "--model", model_dir, "--data", SAMPLES / "alpaca.jsonl", "--steps", "4",
             "--lr", "5e-2", "--warmup", "0", "--batch-size", "4", "--runs-dir", runs)
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    files = {}
    for q in QUANTS:
        out = backprop("export", run.name, "--format", "gguf", "--quant", q, "--runs-dir", runs).stdout.strip()
        (files[q],) = [p for p in __import__("pathlib").Path(out).iterdir() if p.suffix == ".gguf"]
    merged = backprop("export", run.name, "--format", "merged", "--dtype", "f32", "--runs-dir", runs).stdout.strip()
    return model_dir, run, files, merged


def field(reader, key):
    return reader.fields[key].contents()


def hf_to_gguf(name):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    table = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{layer}.{table[rest]}"


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(merged_dir):
    from safetensors.numpy import load_file
    cfg = json.loads((__import__("pathlib").Path(merged_dir) / "config.json").read_text())
    weights = load_file(f"{merged_dir}/model.safetensors")
    out = {}
    for name, w in weights.items():
        if cfg["model_type"] in ("llama", "mistral"):
            if "q_proj" in name:
                w = permute(w, cfg["num_attention_heads"])
            elif "k_proj" in name:
                w = permute(w, cfg["num_key_value_heads"])
        out[hf_to_gguf(name)] = w.astype(np.float32)
    return cfg, out


@pytest.mark.parametrize("quant", list(QUANTS))
def test_gguf_py_reads_metadata_and_bytes_match_the_reference_quantizer(exported, quant):
    model_dir, run, files, merged = exported
    reader = GGUFReader(files[quant])
    cfg, expected = expected_tensors(merged)
    arch = field(reader, "general.architecture")
    assert arch == {"llama": "llama", "mistral": "llama"}.get(cfg["model_type"], cfg["model_type"])
    assert field(reader, f"{arch}.block_count") == cfg["num_hidden_layers"]
    assert field(reader, f"{arch}.embedding_length") == cfg["hidden_size"]
    assert field(reader, f"{arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == cfg["vocab_size"] and all(vocab[t] == i for i, t in enumerate(tokens))
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.chat_template") == tok.chat_template
    names = {t.name for t in reader.tensors}
    assert set(expected) <= names
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        want = expected[t.name]
        assert list(t.shape[::-1]) == list(want.shape), t.name
        if want.ndim == 1:
            assert t.tensor_type == GGMLQuantizationType.F32, t.name
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), t.name
            continue
        assert t.tensor_type == QUANTS[quant], t.name
        ref = quantize(want, QUANTS[quant]) if quant != "f32" else want
        got = np.asarray(t.data).reshape(np.asarray(ref).shape)
        assert np.asarray(ref).tobytes() == got.tobytes(), f"{quant} bytes differ from llama.cpp's reference for {t.name}"


def _llama(path, **kw):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kw)


def _prompt(tok):
    messages = json.loads((SAMPLES / "messages.jsonl").read_text().splitlines()[1])["messages"]
    messages = [m for m in messages if m["role"] != "system"][:1]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tok(text, add_special_tokens=False)["input_ids"]


def test_llama_cpp_tokenizes_like_hugging_face(exported):
    model_dir, run, files, merged = exported
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = _llama(files["f32"], vocab_only=True)
    for line in (SAMPLES / "alpaca.jsonl").read_text().splitlines()[:20]:
        rec = json.loads(line)
        text = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]},
                                        {"role": "assistant", "content": rec["output"]}], tokenize=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    differ = [t for t in varied_texts()
              if llm.tokenize(t.encode(), add_bos=False, special=False) != tok(t, add_special_tokens=False)["input_ids"]]
    assert not differ, f"{len(differ)} of {len(varied_texts())} texts tokenize differently, e.g. {differ[0]!r}"
    # BOS as transformers adds it, and every end-of-turn token listed for Ollama.
    reader = GGUFReader(files["f32"])
    with_bos = tok("a")["input_ids"]
    assert field(reader, "tokenizer.ggml.add_bos_token") == (with_bos[0] == tok.bos_token_id != with_bos[-1])
    assert tok.eos_token_id in list(field(reader, "tokenizer.ggml.eos_token_ids"))


def test_llama_cpp_logits_and_greedy_generation_match_ours(backprop, exported, tmp_path):
    model_dir, run, files, merged = exported
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, ids = _prompt(tok)
    ours = our_logits(backprop, model_dir, run / "adapter", ids, tmp_path).numpy()
    for quant, tol in [("f32", 1e-3), ("f16", 5e-2)]:
        llm = _llama(files[quant])
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)])
        diff = float(np.abs(theirs - ours).max())
        print(f"{quant}: max |logit difference| vs llama.cpp = {diff:.2e}")
        assert diff < tol, f"{quant}: llama.cpp logits differ by {diff}"
    llm = _llama(files["f32"])
    llm.eval(ids)
    generated = []
    for _ in range(12):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(nxt)
        llm.eval([nxt])
    ours_gen = json.loads(backprop("debug", "generate", "--model", model_dir, "--adapter", run / "adapter",
                                   "--prompt-ids", ",".join(map(str, ids)), "--max-new", "12").stdout)
    assert generated == ours_gen


def test_gguf_lora_adapter_on_the_gguf_base_matches_ours(backprop, exported, tmp_path):
    model_dir, run, files, merged = exported
    runs = run.parent
    lora_dir = backprop("export", run.name, "--format", "gguf-lora", "--quant", "f32", "--runs-dir", runs).stdout.strip()
    base_dir = backprop("export", run.name, "--format", "gguf-base", "--quant", "f32", "--runs-dir", runs).stdout.strip()
    (lora,) = __import__("pathlib").Path(lora_dir).glob("*.gguf")
    (base,) = __import__("pathlib").Path(base_dir).glob("*.gguf")
    reader = GGUFReader(lora)
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 32.0
    names = [t.name for t in reader.tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, ids = _prompt(tok)
    ours = our_logits(backprop, model_dir, run / "adapter", ids, tmp_path).numpy()
    plain = _llama(base)
    plain.eval(ids)
    with_lora = _llama(base, lora_path=str(lora))
    with_lora.eval(ids)
    diff = float(np.abs(np.asarray(with_lora.scores[: len(ids)]) - ours).max())
    moved = float(np.abs(np.asarray(plain.scores[: len(ids)]) - ours).max())
    print(f"base + GGUF LoRA vs ours: {diff:.2e} (base alone: {moved:.2e})")
    assert diff < 1e-3 and moved > 1e-2
