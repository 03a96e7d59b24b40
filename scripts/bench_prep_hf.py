"""HF datasets anchor for `conala bench prep`: the same preparation with the Python stack.

load_dataset("parquet") -> filter (batched) -> map(format) -> map(fast tokenizer, truncation), num_proc=1,
on the same parquet input and tokenizer.json. Prints one JSON line: rows_in, rows_out, seconds.
Usage: python3 scripts/bench_prep_hf.py INPUT_DIR TOKENIZER_JSON CACHE_DIR
"""
import glob
import json
import os
import sys
import time

from datasets import load_dataset
from transformers import PreTrainedTokenizerFast


def main(inp: str, tokenizer_json: str, cache: str) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    files = sorted(glob.glob(os.path.join(inp, "*.parquet")))
    start = time.perf_counter()
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    rows_in = len(ds)
    ds = ds.filter(
        lambda b: [i is not None and r is not None for i, r in zip(b["intent"], b["rewritten_intent"])],
        batched=True,
        num_proc=1,
    )
    ds = ds.map(lambda b: {"input": [f"{i}\n{s}" for i, s in zip(b["intent"], b["snippet"])]}, batched=True, num_proc=1)

    def tokenize(b):
        enc = tok(b["input"], truncation=True, max_length=512)
        lab = tok(text_target=b["rewritten_intent"], truncation=True, max_length=128)
        return {
            "input_ids": enc["input_ids"],
            "n_input_tokens": [len(x) for x in enc["input_ids"]],
            "labels": lab["input_ids"],
            "n_label_tokens": [len(x) for x in lab["input_ids"]],
        }

    ds = ds.map(tokenize, batched=True, num_proc=1)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows_in": rows_in, "rows_out": len(ds), "seconds": seconds}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
