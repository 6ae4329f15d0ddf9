"""One forward/backward pass of our engine (`backprop debug probe`) must match PyTorch +
PEFT on the same base model, adapter and batch: logits, loss and every LoRA gradient."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SAMPLES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROW_LENGTHS = [37, 52, 20]
LOGITS_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4

CASES = {
    "r8": dict(r=8, lora_alpha=16, use_rslora=False),
    "r4-rslora": dict(r=4, lora_alpha=16, use_rslora=True),
}


def make_batch(tok):
    """Rows of different lengths from real chat renderings; the first half of every
    row's labels is masked so the loss only sees the second half."""
    convs = [json.loads(line)["messages"] for line in (SAMPLES / "messages.jsonl").read_text(encoding="utf-8").splitlines()]
    # Mistral's template refuses system turns; use conversations every template accepts.
    convs = [m for m in convs if m[0]["role"] != "system"]
    input_ids, labels = [], []
    for messages, n in zip(convs, ROW_LENGTHS):
        ids = tok.apply_chat_template(messages, tokenize=True)
        ids = list(ids)
        assert len(ids) >= n, f"sample too short for a {n}-token row"
        ids = [int(t) for t in ids[:n]]
        input_ids.append(ids)
        labels.append([-100] * (n // 2) + ids[n // 2 :])
    return input_ids, labels


def pad(rows, value, width):
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def peft_reference(model_dir, case):
    torch.manual_seed(1234)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    config = LoraConfig(
        lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM", **CASES[case]
    )
    model = get_peft_model(base, config)
    model.eval()
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_probe_matches_pytorch_peft(backprop, any_family_dir, tmp_path, case):
    model_dir = any_family_dir
    family = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    input_ids, labels = make_batch(tok)

    model = peft_reference(model_dir, case)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(TARGETS)

    batch_path = tmp_path / "batch.json"
    batch_path.write_text(json.dumps({"input_ids": input_ids, "labels": labels}))
    out_path = tmp_path / "out.safetensors"
    backprop(
        "debug", "probe", "--model", model_dir, "--adapter", adapter_dir,
        "--batch", batch_path, "--out", out_path,
    )
    ours = load_file(out_path)

    # Reference: right-padded batch through PEFT, loss averaged by HF over all targets.
    width = max(ROW_LENGTHS)
    ids_t = pad(input_ids, 0, width)
    labels_t = pad(labels, -100, width)
    mask = pad([[1] * len(r) for r in input_ids], 0, width)
    model.zero_grad()
    ref = model(input_ids=ids_t, attention_mask=mask, labels=labels_t)
    ref.loss.backward()

    tag = f"{family}/{case}"
    # Logits at real (non-padded) positions.
    assert ours["logits"].shape == ref.logits.shape, tag
    real = mask.bool()
    logits_diff = (ours["logits"][real] - ref.logits.detach()[real]).abs().max().item()
    # The LoRA path must actually move the logits, or the comparison proves little.
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids_t, attention_mask=mask).logits
    lora_effect = (ref.logits.detach()[real] - base_logits[real]).abs().max().item()

    loss_diff = abs(ours["loss"].item() - ref.loss.item())

    ref_grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, f"{tag}: no PyTorch grad for {name}"
            ref_grads["grad." + name.replace(".default.weight", ".weight")] = p.grad
    our_grads = {k: v for k, v in ours.items() if k.startswith("grad.")}
    assert set(our_grads) == set(ref_grads), (
        f"{tag}: key mismatch; only ours: {sorted(set(our_grads) - set(ref_grads))[:5]}, "
        f"only PEFT: {sorted(set(ref_grads) - set(our_grads))[:5]}"
    )
    grad_diffs = {}
    for k, g in ref_grads.items():
        assert our_grads[k].shape == g.shape, f"{tag}: {k} shape {our_grads[k].shape} vs {g.shape}"
        grad_diffs[k] = (our_grads[k] - g).abs().max().item()
    worst_key = max(grad_diffs, key=grad_diffs.get)
    grad_diff = grad_diffs[worst_key]
    min_a = min(g.abs().max().item() for k, g in ref_grads.items() if "lora_A" in k)
    min_b = min(g.abs().max().item() for k, g in ref_grads.items() if "lora_B" in k)

    print(
        f"\n[{tag}] loss ours={ours['loss'].item():.7f} ref={ref.loss.item():.7f} "
        f"|d|={loss_diff:.3g}; logits max|d|={logits_diff:.3g} (LoRA effect {lora_effect:.3g}); "
        f"grads max|d|={grad_diff:.3g} at {worst_key} over {len(grad_diffs)} tensors "
        f"(smallest per-tensor max|g|: A {min_a:.3g}, B {min_b:.3g})"
    )

    assert lora_effect > 1e-3, f"{tag}: LoRA barely changes logits ({lora_effect:.3g})"
    assert min_a > 1e-6 and min_b > 1e-6, f"{tag}: some LoRA grads are ~zero (A {min_a:.3g}, B {min_b:.3g})"
    assert logits_diff <= LOGITS_TOL, f"{tag}: logits max abs diff {logits_diff:.3g}"
    assert loss_diff <= LOSS_TOL, f"{tag}: loss diff {loss_diff:.3g} (ours {ours['loss'].item()}, ref {ref.loss.item()})"
    assert grad_diff <= GRAD_TOL, f"{tag}: grad max abs diff {grad_diff:.3g} at {worst_key}"
