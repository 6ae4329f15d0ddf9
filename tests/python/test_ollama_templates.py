"""The Go template, system prompt and stops a push sends Ollama must give the model the
prompt it was trained on: for every family (and the real SmolLM2), conversations are
rendered by transformers from the model's Jinja and by Go's own text/template from our
Go template, as Ollama's server feeds it (tests/python/ollama_render), and must be equal.

Needs `go` (scripts/setup.sh installs Debian's golang-go)."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer

from conftest import ROOT

TEMPLATES = ROOT / "tests" / "python" / "chat_templates"

REAL = pathlib.Path(os.environ.get("BACKPROP_REAL_MODEL", "/nonexistent"))

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nShow your work."},
    ],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.fail("`go` is missing: scripts/setup.sh installs golang-go (Go's text/template is the reference)")
    out = tmp_path_factory.mktemp("ollama-render") / "ollama-render"
    env = dict(os.environ, GOFLAGS="-mod=mod", GO111MODULE="off",
               GOCACHE=os.environ.get("GOCACHE", str(pathlib.Path.home() / ".cache" / "go-build")))
    subprocess.run([go, "build", "-o", str(out), str(ROOT / "tests/python/ollama_render/main.go")],
                   check=True, env=env)

    def render(cases):
        proc = subprocess.run([str(out)], input=json.dumps(cases), capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    return render


def our_modelfile(backprop, model):
    return json.loads(backprop("ollama", "modelfile", model, "--json").stdout)


def hf_prompt(tok, messages):
    """What training saw before the reply. A BOS the Jinja writes (Llama 3, Mistral) is
    left out when the tokenizer adds BOS itself: Ollama's templates never write it, and
    llama.cpp adds it as a token because our GGUF's add_bos follows transformers
    (test_gguf). SmolLM2's bos_token is `<|im_start|>`, which stays."""
    # Thinking off: what a fine-tune without reasoning data is served with (Qwen3).
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if adds_bos and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    return text


def check_equal(backprop, go_render, model):
    tok = AutoTokenizer.from_pretrained(model)
    ours = our_modelfile(backprop, model)
    cases, wants = [], []
    for messages in CONVERSATIONS:
        try:
            want = hf_prompt(tok, messages)
        except Exception as e:  # the template refuses this conversation (Mistral: no system role)
            assert "system" in str(e).lower() or "roles" in str(e).lower(), e
            continue
        cases.append({"template": ours["template"], "system": ours["system"] or "", "messages": messages})
        wants.append(want)
    assert cases, "no conversation rendered"
    got = go_render(cases)
    for case, want, have in zip(cases, wants, got):
        assert not isinstance(have, dict), have
        assert have == want, f"{ours['family']}: {case['messages']}\n--- Jinja (transformers)\n{want!r}\n--- Go template (Ollama)\n{have!r}"
    return ours


def test_go_templates_give_the_trained_prompt_for_every_family(backprop, go_render, any_family_dir):
    ours = check_equal(backprop, go_render, any_family_dir)
    assert ours["family"] in {"chatml", "qwen3", "llama3", "mistral"}
    assert ours["stop"], "every family has stops"


@pytest.mark.skipif(not REAL.is_dir(), reason="BACKPROP_REAL_MODEL (SmolLM2-135M-Instruct) not installed")
def test_go_template_gives_smollm2_its_trained_prompt(backprop, go_render):
    ours = check_equal(backprop, go_render, REAL)
    assert ours["family"] == "chatml"
    assert ours["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# (fixture family, real template file, the family our push recognises)
REAL_TEMPLATES = [
    ("llama", "llama3.1.jinja", "llama31"),
    ("qwen3", "qwen3.jinja", "qwen3"),
    ("mistral", "mistral-small-3.1.jinja", "mistraltekken"),
]


@pytest.mark.parametrize("family,template,want", REAL_TEMPLATES, ids=[t[2] for t in REAL_TEMPLATES])
def test_go_templates_give_the_trained_prompt_for_real_family_templates(
        backprop, go_render, tmp_path, family, template, want):
    model = tmp_path / family
    backprop("fixture", model, "--family", family)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (TEMPLATES / template).read_text()
    config_path.write_text(json.dumps(config))
    ours = check_equal(backprop, go_render, model)
    assert ours["family"] == want
    if want == "llama31":
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in ours["template"]
    if want == "qwen3":
        assert ours["template"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if want == "mistraltekken":
        assert ours["system"].startswith("You are Mistral Small 3")
