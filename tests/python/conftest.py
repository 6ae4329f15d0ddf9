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


def varied_texts():
    """A few hundred texts where pre-tokenizers disagree: indented code (spaces and
    tabs), CRLF and lone-CR line ends, digit runs, dates and decimals, accents, CJK,
    Cyrillic, Arabic, Khmer, emoji with joiners, whitespace runs, contractions, and every
    sample text, each also with CRLF line ends."""
    base = [
        "def f(x):\n    if x > 1:\n        return x * 2\n\treturn -1\n",
        "for (int i = 0; i < 10; ++i) {\r\n    sum += a[i];\r\n}\r\n",
        "line one\rline two\r\n\r\nline four  \n\n\n   indented\n\t\ttabbed",
        "3 33 333 3333 33333 1234567890 3.14159 1,234,567.89 2026-12-01 0x1F 1e-5 -42",
        "café naïve façade Ærøskøbing Straße ğüşiöç",
        "我想在apple工作1314151天～ 東京は日本の首都です。 한국어 텍스트",
        "нещо на Български — Привет, мир! Ünïcödé",
        "مرحبا بالعالم ١٢٣ שלום עולם",
        "កាន់តែពិសេសអាច ภาษาไทย हिन्दी",
        "🚀 (normal) 😶\u200d🌫️ (emojis) ✅ 🦙🦙 👩\u200d👩\u200d👧 🇫🇷",
        "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
        "```````\"\"\"\"......!!!!!!?????? ------======= ~~~ ***",
        "   leading spaces and trailing   ",
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
        "<html>\n  <body class=\"x\">Hi &amp; bye</body>\n</html>",
        "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
        "$ ls -la | grep '^d' > dirs.txt && echo \"done\"",
        "x=[1,2,3]; y={'a':1}; print(f\"{x!r:>10}\")",
    ]
    for path in ("alpaca.jsonl", "messages.jsonl"):
        for line in (SAMPLES / path).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "messages" in rec:
                base += [m["content"] for m in rec["messages"]]
            else:
                base += [v for v in rec.values() if isinstance(v, str) and v]
    texts = []
    for t in base:
        texts.append(t)
        if "\n" in t:
            texts.append(t.replace("\n", "\r\n"))
    return texts


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
