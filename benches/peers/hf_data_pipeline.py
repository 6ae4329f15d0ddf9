"""Peer for the data-pipeline bench: Hugging Face transformers renders each
conversation with apply_chat_template and tokenizes it (batched, fast tokenizer), as
a TRL/PEFT training script does. Prints the median wall time in seconds."""

import json
import statistics
import sys
import time

from transformers import AutoTokenizer

data, model, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model)
times = []
for _ in range(runs):
    t = time.perf_counter()
    with open(data, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for line in f]
    texts = [tok.apply_chat_template(m, tokenize=False) for m in convs]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    times.append(time.perf_counter() - t)
print(statistics.median(times))
