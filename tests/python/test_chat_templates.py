"""Our chat-template rendering, tokenization and assistant-only loss masks must match
what Hugging Face transformers produces for the same model folder and messages."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import SAMPLES, data_report

CHAT_FILES = ["alpaca.jsonl", "messages.jsonl", "sharegpt.jsonl", "prompt_completion.jsonl"]


def hf_assistant_spans(tok, messages):
    """Byte ranges of assistant replies, found with HF's own renderer: from the end of
    the generation prompt before a reply to the end of the rendering that includes it."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(upto) and upto.startswith(prefix)
        spans.append((len(prefix.encode()), len(upto.encode())))
    return full, spans


@pytest.mark.parametrize("name", CHAT_FILES)
def test_rendering_ids_and_masks_match_transformers(backprop, model_dir, name):
    tok = AutoTokenizer.from_pretrained(model_dir)
    report = data_report(backprop, SAMPLES / name, model_dir)
    assert report["ok"]
    samples = report["samples"]
    assert len(samples) == report["stats"]["samples"] >= 20
    for s in samples:
        messages = s["content"]["chat"]
        full, spans = hf_assistant_spans(tok, messages)
        assert s["text"] == full, f"line {s['line']}"
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert s["input_ids"] == enc["input_ids"], f"line {s['line']}"
        raw = full.encode()
        # HF offsets are in characters; convert to bytes to compare with our spans.
        char_to_byte = [len(full[:i].encode()) for i in range(len(full) + 1)]
        expected = [
            tid if any(a <= char_to_byte[start] < b for a, b in spans) else -100
            for tid, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        assert s["labels"] == expected, f"line {s['line']}"
        assert raw  # non-empty rendering


def test_alpaca_records_become_the_conversations_hf_users_write(backprop, model_dir):
    report = data_report(backprop, SAMPLES / "alpaca.jsonl", model_dir)
    lines = (SAMPLES / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    for s in report["samples"]:
        rec = json.loads(lines[s["line"] - 1])
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        expected = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        assert s["content"]["chat"] == expected


def test_text_records_tokenize_like_hf_plus_eos(backprop, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    report = data_report(backprop, SAMPLES / "text.jsonl", model_dir)
    for s in report["samples"]:
        ids = tok(s["content"]["text"])["input_ids"] + [tok.eos_token_id]
        assert s["input_ids"] == ids
        assert s["labels"] == ids


def test_bad_file_reports_every_line_as_json(backprop, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\nnot json\n', encoding="utf-8")
    proc = backprop("data", "check", bad, "--model", model_dir, "--json", check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert not report["ok"]
    assert [(p["line"], p["message"]) for p in report["problems"]][0] == (2, "missing field `output`")
    assert report["problems"][1]["line"] == 3
    assert list(tmp_path.iterdir()) == [bad], "checking writes nothing"
