"""Gathers the benchmark reports in a folder into one report.md: a summary table of
the ours/peer ratios, then every report as written. Usage: report.py BENCH_DIR."""

import datetime
import pathlib
import re
import sys

ORDER = [
    ("data_pipeline.md", "Data pipeline vs transformers"),
    ("train_vs_peft.md", "LoRA training vs PyTorch + PEFT (fixture)"),
    ("train_vs_peft_real.md", "LoRA training vs PyTorch + PEFT (SmolLM2-135M)"),
    ("train_vs_peft_real_bf16.md", "LoRA training, ours bf16 vs PyTorch + PEFT f32 (SmolLM2-135M)"),
    ("train_vs_peft_real_bf16_autocast.md", "LoRA training, bf16 on both sides (SmolLM2-135M)"),
    ("gguf_vs_llama_quantize.md", "GGUF export vs llama.cpp's quantizer"),
]


def ratios(text: str) -> list[str]:
    """The ours/peer ratios of a report: its bold `**x.yz×**` cells, or else the `time
    ratio` column of a per-quantization table (the GGUF report)."""
    bold = re.findall(r"\*\*([0-9.]+×)\*\*", text)
    if bold:
        return bold
    rows = re.findall(r"^\| (\w+) \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+×) \|", text, re.M)
    return [f"{q} time {r}" for q, r in rows]


def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    found = [(f, title, (folder / f).read_text()) for f, title in ORDER if (folder / f).exists()]
    lines = [
        "# Backpropagate benchmarks",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; each peer measured in the same run.",
        "",
        "| benchmark | ratios (ours / peer, as each report defines them) |",
        "| --- | --- |",
    ]
    for f, title, text in found:
        lines.append(f"| [{title}](#{f[:-3]}) | {', '.join(ratios(text)) or 'see below'} |")
    for png in ("loss_curves.png", "loss_curves_real.png"):
        if (folder / png).exists():
            lines += ["", f"![loss curves]({png})"]
    for f, title, text in found:
        lines += ["", f'<a id="{f[:-3]}"></a>', "", text.strip()]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    print(folder / "report.md")


if __name__ == "__main__":
    main()
