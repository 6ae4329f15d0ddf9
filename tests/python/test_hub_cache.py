"""The Hugging Face cache is shared with Python tools, both ways: a model `backprop model
pull` downloaded is found by huggingface_hub and transformers offline, and a model
huggingface_hub downloaded is found by `backprop` offline. Both talk to the hub
stand-in (`HF_ENDPOINT`), since the real hub is unreachable here."""

import os
import pathlib
import subprocess

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def hub(model_dir):
    exe = pathlib.Path(os.environ["BACKPROP_BIN"]).with_name("hub-standin")
    proc = subprocess.Popen(
        [exe, "--repo", f"test-org/tiny={model_dir}"], stdout=subprocess.PIPE, text=True
    )
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    proc.kill()
    proc.wait()


def env_with(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_backprop_downloads_are_found_by_python(backprop, hub, tmp_path, model_dir):
    cache = tmp_path / "hub"
    out = subprocess.run(
        [os.environ["BACKPROP_BIN"], "model", "pull", "test-org/tiny"],
        env=env_with(HF_ENDPOINT=hub, HF_HUB_CACHE=cache),
        capture_output=True,
        text=True,
        check=True,
    )
    ours = pathlib.Path(out.stdout.strip())
    theirs = huggingface_hub.snapshot_download(
        "test-org/tiny", cache_dir=cache, local_files_only=True
    )
    assert pathlib.Path(theirs) == ours
    config = transformers.AutoConfig.from_pretrained(
        "test-org/tiny", cache_dir=cache, local_files_only=True
    )
    assert config.architectures[0].endswith("ForCausalLM")
    tok = transformers.AutoTokenizer.from_pretrained(
        "test-org/tiny", cache_dir=cache, local_files_only=True
    )
    reference = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok("Hello there")["input_ids"] == reference("Hello there")["input_ids"]


def test_python_downloads_are_found_by_backprop(hub, tmp_path):
    cache = tmp_path / "hub"
    old = os.environ.get("HF_ENDPOINT")
    # huggingface_hub reads its endpoint when imported; pass it explicitly instead.
    path = huggingface_hub.snapshot_download(
        "test-org/tiny", cache_dir=cache, endpoint=hub
    )
    assert old == os.environ.get("HF_ENDPOINT")
    out = subprocess.run(
        [os.environ["BACKPROP_BIN"], "model", "pull", "test-org/tiny"],
        env=env_with(HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1, HF_ENDPOINT="http://127.0.0.1:1"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert pathlib.Path(out.stdout.strip()) == pathlib.Path(path)
