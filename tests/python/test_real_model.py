"""The real pretrained SmolLM2-135M-Instruct (scripts/real-model.sh; test.sh installs
it): our forward pass and greedy generation against transformers in float32, and a
short LoRA run whose loss falls. Skipped when the model is not installed."""

import json
import os
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REAL = pathlib.Path(os.environ.get("BACKPROP_REAL_MODEL", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not (REAL / "model.safetensors").is_file(),
    reason="the real model is not installed (bash scripts/real-model.sh)",
)
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference():
    tok = AutoTokenizer.from_pretrained(REAL)
    model = AutoModelForCausalLM.from_pretrained(REAL, dtype=torch.float32)
    model.eval()
    return tok, model


def test_greedy_answer_matches_transformers(backprop, reference):
    tok, model = reference
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False)
    ref_new = ref[0][len(ids):].tolist()
    out = backprop("debug", "generate", "--model", REAL, "--prompt-ids",
                   ",".join(map(str, ids)), "--max-new", "12")
    ours = json.loads(out.stdout)
    ours_new = ours[len(ids):] if ours[:len(ids)] == ids else ours
    # transformers stops at the end-of-turn token; `debug generate` runs to --max-new.
    assert ours_new[: len(ref_new)] == ref_new, (tok.decode(ours_new), tok.decode(ref_new))
    assert "Paris" in tok.decode(ours_new)


def test_text_reply_matches_transformers_and_stops_at_the_end_of_the_turn(backprop, reference):
    """`debug generate --prompt` (what the demo's before/after uses): the chat template,
    greedy decoding and the stop at `<|im_end|>`, as transformers' generate does."""
    tok, model = reference
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id)
    want = tok.decode(ref[0][len(ids):], skip_special_tokens=True).strip()
    ours = backprop("debug", "generate", "--model", REAL, "--prompt", PROMPT[0]["content"],
                    "--max-new", "40").stdout.strip()
    assert ours == want


def test_lora_training_lowers_the_loss(backprop, tmp_path):
    runs = tmp_path / "runs"
    data = pathlib.Path(__file__).parents[2] / "assets" / "samples" / "messages.jsonl"
    out = backprop("train", "--model", REAL, "--data", data, "--steps", "8", "--batch-size", "2",
                   "--max-seq-len", "160", "--lr", "1e-3", "--runs-dir", runs, "--json")
    steps = [json.loads(line) for line in out.stdout.splitlines() if '"type":"Step"' in line]
    assert len(steps) == 8
    first = sum(s["loss"] for s in steps[:2]) / 2
    last = sum(s["loss"] for s in steps[-2:]) / 2
    # A pretrained model starts near its real loss on chat text (far below ln V ≈ 10.8)
    # and a few LoRA steps on in-domain data lower it.
    assert first < 6, first
    assert last < first, (first, last)


def test_trained_gguf_answers_in_llama_cpp(backprop, tmp_path):
    """Train a little (at a tiny learning rate, so the base model's knowledge is what is
    asked for), export GGUF with our writer, and let llama.cpp chat with it through the
    chat template stored in the file."""
    from llama_cpp import Llama

    runs = tmp_path / "runs"
    data = pathlib.Path(__file__).parents[2] / "assets" / "samples" / "alpaca.jsonl"
    backprop("train", "--model", REAL, "--data", data, "--steps", "4", "--batch-size", "2",
             "--max-seq-len", "128", "--lr", "1e-6", "--runs-dir", runs, "--name", "real")
    run = next(runs.iterdir())
    # f16, not q8_0: a 135M model's greedy answer can flip under 8-bit weights (one
    # llama.cpp build said "L'Étoile, la Cité…" from q8_0 and Paris from f16/f32), and
    # q8_0's bytes are checked against llama.cpp's own quantizer elsewhere.
    out = backprop("export", run, "--format", "gguf", "--quant", "f16")
    gguf = next(pathlib.Path(out.stdout.strip()).glob("*.gguf"))
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    reply = llm.create_chat_completion(messages=PROMPT, max_tokens=20, temperature=0)
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


def test_our_gguf_tokenizes_like_transformers(backprop, tmp_path):
    """SmolLM2's tokenizer is plain GPT-2 byte-level BPE, so the GGUF says `gpt-2`
    (detected from the tokenizer, not the architecture; llama.cpp's converter says
    `smollm`, which splits non-ASCII digits apart), adds no BOS (its tokenizer_config
    says so), and llama.cpp then gives transformers' ids on every varied text: code,
    CRLF, digits, scripts, emoji."""
    from gguf import GGUFReader
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from conftest import varied_texts

    runs = tmp_path / "runs"
    data = pathlib.Path(__file__).parents[2] / "assets" / "samples" / "alpaca.jsonl"
    backprop("train", "--model", REAL, "--data", data, "--steps", "1", "--batch-size", "1",
             "--max-seq-len", "64", "--runs-dir", runs, "--name", "tok")
    run = next(runs.iterdir())
    out = backprop("export", run, "--format", "gguf", "--quant", "q8_0")
    gguf = next(pathlib.Path(out.stdout.strip()).glob("*.gguf"))
    reader = GGUFReader(gguf)
    value = lambda k: reader.fields[k].contents()
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.add_bos_token") is False
    tok = AutoTokenizer.from_pretrained(REAL)
    assert list(value("tokenizer.ggml.eos_token_ids")) == [tok.eos_token_id]
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    differ = [t for t in varied_texts()
              if llm.tokenize(t.encode(), add_bos=False, special=False) != tok(t, add_special_tokens=False)["input_ids"]]
    assert not differ, f"{len(differ)} of {len(varied_texts())} texts differ, e.g. {differ[0]!r}"

