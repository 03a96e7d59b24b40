"""Python anchors for `conala bench generate`: HF transformers `generate` and CTranslate2 on the same model
folder, inputs and work (greedy, exactly N new tokens per row), f32, 2 threads.

Usage: python3 scripts/bench_generate_hf.py MODEL_DIR INPUTS_JSON NEW_TOKENS [--natural]
INPUTS_JSON holds a list of token-id lists (already tokenized and truncated by conala, so both sides see
the same ids). Prints one JSON line per engine: {"engine", "rows", "tokens", "seconds"}.
"""
import json
import os
import sys
import tempfile
import time

import torch


def hf(model_dir, inputs, new_tokens, natural):
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(2)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    kw = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    if not natural:
        kw["min_new_tokens"] = new_tokens
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), 32):
            rows = [inputs[i] for i in order[b : b + 32]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            for seq in out[:, 1:].tolist():
                n = 0
                for t in seq:
                    n += 1
                    if t == 1:
                        break
                tokens += n if natural else len(seq)
    return {"engine": "hf-transformers", "rows": len(inputs), "tokens": tokens, "seconds": time.perf_counter() - start}


def ct2(model_dir, inputs, new_tokens, natural):
    import ctranslate2
    from tokenizers import Tokenizer

    out_dir = tempfile.mkdtemp(prefix="ct2-")
    conv = ctranslate2.converters.TransformersConverter(model_dir)
    conv.convert(out_dir, quantization="float32", force=True)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    translator = ctranslate2.Translator(out_dir, device="cpu", compute_type="float32", inter_threads=1, intra_threads=2)
    batch = [[tok.id_to_token(i) for i in r] for r in inputs]
    kw = dict(max_batch_size=32, beam_size=1, max_decoding_length=new_tokens)
    if not natural:
        kw["min_decoding_length"] = new_tokens
    start = time.perf_counter()
    results = translator.translate_batch(batch, **kw)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.hypotheses[0]) + (1 if natural and len(r.hypotheses[0]) < new_tokens else 0) for r in results)
    return {"engine": "ctranslate2", "rows": len(inputs), "tokens": tokens, "seconds": seconds}


if __name__ == "__main__":
    model_dir, inputs_path, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    natural = "--natural" in sys.argv
    with open(inputs_path) as f:
        inputs = json.load(f)
    for engine in (hf, ct2):
        try:
            print(json.dumps(engine(model_dir, inputs, new_tokens, natural)), flush=True)
        except Exception as e:  # an engine that is not installed is skipped, not fatal
            print(json.dumps({"engine": engine.__name__, "error": str(e)}), flush=True)
