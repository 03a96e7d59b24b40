"""Interop with HF transformers and PEFT, checked end to end (run by hand: needs torch, transformers, peft).

1. `conala model init` writes a model; HF transformers loads it and its greedy generations equal ours.
2. `conala run` trains a LoRA adapter on it; PEFT loads the adapter and its greedy generations equal ours
   (base + adapter).
3. `conala merge` folds the adapter in; HF transformers loads the merged checkpoint and gives the same greedy
   generations again.

usage: python scripts/check_hf_interop.py [--conala target/release/conala] [--family flan-t5|t5|ul2|bart] [--work DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

ap = argparse.ArgumentParser()
ap.add_argument("--conala", default=os.path.expanduser("~/.cache/conala-target/release/conala"))
ap.add_argument("--family", default="flan-t5")
ap.add_argument("--work", default=None)
ap.add_argument("--rows", type=int, default=40)
ap.add_argument("--new-tokens", type=int, default=24)
args = ap.parse_args()
# A tiny BART trained briefly from HF's init predicts `</s>` first (a unigram model): at least 12 new
# tokens and no repeated bigram make every row a ranking of many candidates, on both sides.
decoding = dict(min_new_tokens=12, no_repeat_ngram_size=2) if args.family == "bart" else {}
work = args.work or tempfile.mkdtemp(prefix="conala-interop-")
tok = "data/tokenizer/conala-unigram-8k.json"


def conala(*a):
    r = subprocess.run([args.conala, *a], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"conala {' '.join(a)} failed:\n{r.stderr}")
    return r.stdout


def generate_plan(model, adapter, out):
    adapter_line = f', adapter: "{adapter}"' if adapter else ""
    extra = "".join(f", {k}: {v}" for k, v in decoding.items())
    plan = f"""name: interop
model: {{ path: "{model}"{adapter_line}, dtype: f32, device: cpu }}
steps:
  - source: {{ uri: data/conala, config: curated, split: test, limit: {args.rows} }}
  - format: {{ input: "{{intent}}\\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 64, tokenizer: "{tok}" }}
  - generate: {{ output: out, max_new_tokens: {args.new_tokens}, do_sample: false, keep_order: true{extra} }}
  - write: {{ path: "{out}", mode: overwrite, columns: [row_id, input_ids, out_ids, out] }}
"""
    path = os.path.join(work, "plan.yaml")
    open(path, "w").write(plan)
    conala("run", path)
    t = pq.read_table(out).sort_by("row_id")
    return t.column("input_ids").to_pylist(), t.column("out_ids").to_pylist()


def strip(ids):
    out = []
    for t in ids:
        if t == 1:
            break
        out.append(t)
    return out


def hf_generate(model, inputs):
    model.eval()
    res = []
    with torch.no_grad():
        for ids in inputs:
            g = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                **decoding,
            )[0].tolist()
            res.append(strip(g[1:]))  # drop the decoder start token
    return res


def compare(name, ours, theirs):
    ours = [strip(o) for o in ours]
    same = sum(o == t for o, t in zip(ours, theirs))
    distinct = len({tuple(o) for o in ours})
    print(f"{name}: {same}/{len(ours)} rows token-identical ({distinct} distinct outputs); first row ours={ours[0][:12]} hf={theirs[0][:12]}")
    return same == len(ours)


def train(model, lora, steps, lr, out):
    plan = f"""name: interop-train
model: {{ path: "{model}" }}
steps:
  - source: {{ uri: data/conala, config: curated, split: train, limit: 400 }}
  - filter: "intent IS NOT NULL AND rewritten_intent IS NOT NULL"
  - format: {{ input: "{{intent}}\\n{{snippet}}" }}
  - tokenize: {{ input: input, target: rewritten_intent, max_input_tokens: 64, max_target_tokens: 32, tokenizer: "{tok}" }}
  - train:
      lora: {lora}
      max_steps: {steps}
      batch_size: 16
      learning_rate: {lr}
      warmup_steps: 20
      save_every: 1000
      output: "{out}"
"""
    path = os.path.join(work, os.path.basename(out) + ".yaml")
    open(path, "w").write(plan)
    conala("run", path)


ok = True
init = os.path.join(work, "init")
conala("model", "init", "--family", args.family, "--size", "tiny", "--vocab", tok, "--seed", "3", "--out", init)
if args.family == "bart":
    # A random BART (HF's init) ends every row at once; a short full fine-tuning makes it say
    # something, and checks that HF loads what full fine-tuning writes.
    train(init, "null", 400, "3.0e-3", os.path.join(work, "full"))
    init = os.path.join(work, "full", "model")
inputs, ours = generate_plan(init, None, os.path.join(work, "g-init"))
ok &= compare("1. model init -> HF transformers", ours, hf_generate(AutoModelForSeq2SeqLM.from_pretrained(init), inputs))

targets = "q_proj, v_proj, fc2" if args.family == "bart" else "q, v, wo"
train(init, f"{{ r: 8, alpha: 32, dropout: 0.05, targets: [{targets}] }}", 40, "2.0e-3", os.path.join(work, "run"))
adapter = os.path.join(work, "run", "adapter")
print("adapter_config.json:", json.load(open(os.path.join(adapter, "adapter_config.json"))))
inputs, ours_adapted = generate_plan(init, adapter, os.path.join(work, "g-adapter"))
changed = sum(a != b for a, b in zip(ours, ours_adapted))
print(f"the adapter changes {changed}/{len(ours)} generations")
peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(init), adapter)
ok &= compare("2. our adapter -> PEFT", ours_adapted, hf_generate(peft_model, inputs))

merged = os.path.join(work, "merged")
conala("merge", "--base", init, "--adapter", adapter, "--out", merged)
ok &= compare("3. conala merge -> HF transformers", ours_adapted, hf_generate(AutoModelForSeq2SeqLM.from_pretrained(merged), inputs))
print("ALL OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
