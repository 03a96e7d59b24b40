"""Python anchors for `conala bench generate`: HF transformers `generate` and CTranslate2 on the same model
folder, inputs and work (greedy, exactly N new tokens per row unless --natural); on the CPU with 2 threads
by default.

Usage: python3 scripts/bench_generate_hf.py MODEL_DIR INPUTS_JSON NEW_TOKENS [--natural]
           [--device cpu|cuda|cuda:N] [--dtype f32|bf16] [--batch-size 32]
INPUTS_JSON holds a list of token-id lists (already tokenized and truncated by conala, so both sides see
the same ids). Prints one JSON line per engine: {"engine", "rows", "tokens", "seconds"}.
"""
import argparse
import json
import os
import tempfile
import time

import torch


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def hf(model_dir, inputs, new_tokens, natural, device, dtype, batch_size):
    from transformers import AutoModelForSeq2SeqLM

    if device == "cpu":
        torch.set_num_threads(2)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    kw = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    if not natural:
        kw["min_new_tokens"] = new_tokens
    tokens = 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            rows = [inputs[i] for i in order[b : b + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            for seq in out[:, 1:].tolist():
                n = 0
                for t in seq:
                    n += 1
                    if t == 1:
                        break
                tokens += n if natural else len(seq)
    sync()
    return {"engine": "hf-transformers", "rows": len(inputs), "tokens": tokens, "seconds": time.perf_counter() - start}


def ct2(model_dir, inputs, new_tokens, natural, device, dtype, batch_size):
    import ctranslate2
    from tokenizers import Tokenizer

    out_dir = tempfile.mkdtemp(prefix="ct2-")
    import transformers

    # CTranslate2's BART loader reads fairseq-era config keys that transformers 5's BartConfig no
    # longer has; BART's values of them.
    for key, value in {"normalize_before": False, "add_final_layer_norm": False}.items():
        if not hasattr(transformers.BartConfig, key):
            setattr(transformers.BartConfig, key, value)
    conv = ctranslate2.converters.TransformersConverter(model_dir)
    compute = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    conv.convert(out_dir, quantization=compute, force=True)
    # A tokenizer without `<s>` (the shipped one, which conala's BARTs are made for) leaves CT2's
    # bos_token null, which it refuses to load; BART's decoder starts from `</s>` anyway.
    cfg_path = os.path.join(out_dir, "config.json")
    cfg = json.load(open(cfg_path))
    if cfg.get("bos_token") is None:
        cfg["bos_token"] = cfg.get("decoder_start_token") or cfg.get("eos_token")
        json.dump(cfg, open(cfg_path, "w"))
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    kind, _, index = device.partition(":")
    translator = ctranslate2.Translator(
        out_dir, device=kind, device_index=int(index or 0), compute_type=compute, inter_threads=1, intra_threads=2
    )
    batch = [[tok.id_to_token(i) for i in r] for r in inputs]
    kw = dict(max_batch_size=batch_size, beam_size=1, max_decoding_length=new_tokens)
    if not natural:
        kw["min_decoding_length"] = new_tokens
    start = time.perf_counter()
    results = translator.translate_batch(batch, **kw)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.hypotheses[0]) + (1 if natural and len(r.hypotheses[0]) < new_tokens else 0) for r in results)
    return {"engine": "ctranslate2", "rows": len(inputs), "tokens": tokens, "seconds": seconds}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("inputs")
    ap.add_argument("new_tokens", type=int)
    ap.add_argument("--natural", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    with open(a.inputs) as f:
        inputs = json.load(f)
    for engine in (hf, ct2):
        try:
            run = engine(a.model_dir, inputs, a.new_tokens, a.natural, a.device, a.dtype, a.batch_size)
            print(json.dumps(run), flush=True)
        except Exception as e:  # an engine that is not installed is skipped, not fatal
            print(json.dumps({"engine": engine.__name__, "error": str(e)}), flush=True)
