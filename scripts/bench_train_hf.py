"""HF transformers + PEFT anchor for `conala bench train` (run by it; prints one JSON line).

Trains the same model folder with LoRA (r=8, alpha=32, dropout=0.05 on PEFT's default targets for the
family; AdamW lr 5e-5, no weight
decay on the LoRA weights' schedule aside; grad-norm clipping 1.0) on the exact batches conala drew, in the
same order (on the CPU with 2 threads by default). The first WARMUP steps are run but not timed. With
--dtype bf16 the base model is bfloat16 and PEFT keeps the LoRA weights in float32 (its default
autocast_adapter_dtype), as conala does.

usage: bench_train_hf.py MODEL_DIR BATCHES_JSON WARMUP [--device cpu|cuda|cuda:N] [--dtype f32|bf16]
"""
import argparse
import json
import sys
import time

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM
except Exception as e:  # the caller reports the anchor as skipped
    print(json.dumps({"engine": "hf+peft", "error": f"missing packages: {e}"}))
    sys.exit(0)

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("batches")
ap.add_argument("warmup", type=int)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
a = ap.parse_args()
model_dir, batches_path, warmup, device = a.model_dir, a.batches, a.warmup, a.device
if device == "cpu":
    torch.set_num_threads(2)
torch.manual_seed(0)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype).to(device)
model = get_peft_model(
    # PEFT's default targets for the model's family (T5: q, v; BART: q_proj, v_proj), as conala's default.
    model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="SEQ_2_SEQ_LM")
)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.01)


def pad(rows, value):
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long, device=device)


sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


batches = []
for b in json.load(open(batches_path)):
    ids = pad(b["input_ids"], model.config.pad_token_id)
    mask = (pad([[1] * len(r) for r in b["input_ids"]], 0)).long()
    labels = pad(b["labels"], -100)
    batches.append((ids, mask, labels))

samples, start = 0, None
for i, (ids, mask, labels) in enumerate(batches):
    if i == warmup:
        sync()
        start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
        samples += ids.shape[0]
sync()
seconds = time.perf_counter() - start
print(json.dumps({"engine": "hf+peft", "samples": samples, "seconds": seconds, "last_loss": float(loss)}))
