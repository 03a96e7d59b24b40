"""bf16 fixtures for conala's T5: HF transformers' outputs in bfloat16 on the parity models.

Run by hand after make_parity_fixtures.py (pip install torch transformers safetensors); for each family
in tests/fixtures/parity/<family>/ it loads the saved model and writes bf16.safetensors:
  logits_bf16                 teacher-forced logits of io.safetensors' batch, the model in bfloat16
  rows_input_ids, rows_mask   64 right-padded rows of 3..25 tokens
  greedy_f32, greedy_bf16     generate(max_new_tokens=16) on those rows, the model in float32 / bfloat16
bf16 rounding flips near-ties between tokens, so HF's own bf16 greedy agrees with its f32 greedy on
only part of the rows; conala's bf16 is held to agree about as often (tests/parity.rs).

Usage: python3 scripts/make_bf16_fixtures.py tests/fixtures/parity
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

ROWS = 64
NEW_TOKENS = 16


def rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 26, (ROWS,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros((ROWS, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = torch.randint(3, 64, (n - 1,), generator=g)
        ids[i, n - 1] = 1  # </s>
        mask[i, :n] = 1
    return ids, mask


@torch.no_grad()
def main(root: str) -> None:
    for i, family in enumerate(["t5", "flan-t5", "ul2"]):
        d = os.path.join(root, family)
        io = load_file(os.path.join(d, "io.safetensors"))
        f32 = T5ForConditionalGeneration.from_pretrained(d).eval()
        bf16 = T5ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()
        ids, mask = rows(200 + i)
        gen = lambda m: m.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
        out = {
            "logits_bf16": bf16(
                input_ids=io["input_ids"].long(),
                attention_mask=io["attention_mask"].long(),
                decoder_input_ids=io["decoder_input_ids"].long(),
            ).logits.float().contiguous(),
            "rows_input_ids": ids,
            "rows_mask": mask,
            "greedy_f32": gen(f32),
            "greedy_bf16": gen(bf16),
        }
        same = sum(torch.equal(a, b) for a, b in zip(out["greedy_f32"], out["greedy_bf16"]))
        print(f"{family}: HF bf16 greedy equals HF f32 greedy on {same}/{ROWS} rows")
        save_file(out, os.path.join(d, "bf16.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
