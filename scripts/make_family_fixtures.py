"""Parity fixtures for the families beyond T5, made by HF transformers (and PEFT, sentencepiece, tokenizers).

Run by hand (pip install torch transformers peft safetensors sentencepiece protobuf tokenizers pyarrow);
writes under tests/fixtures/:

  parity/<family>/          umt5, bart, mbart, plbart: a tiny random model as transformers saves it
    config.json, generation_config.json, model.safetensors
    io.safetensors          as scripts/make_parity_fixtures.py writes for T5 (a right-padded batch, encoder
                            states, teacher-forced logits, their float64 versions, greedy / repetition
                            penalty / beam outputs), plus `num_parameters` (transformers' count)
    bf16.safetensors        the same model in bfloat16: logits, and greedy rows in f32 and bf16
  parity/t5-bin/            a flan-t5 saved as PyTorch pickles: pytorch_model.bin, and the same weights
                            sharded (sharded/pytorch_model-0000N-of-00002.bin + index); io.safetensors
  parity/peft-bart/         a BART base, a PEFT LoRA adapter (q_proj, v_proj) before and after 5 AdamW
                            steps, and PEFT's loss, gradients, weights and greedy outputs
  tokenizers/               sentencepiece/ (spiece.model, trained by sentencepiece on the shipped rows) and
                            bpe/ (vocab.json, merges.txt, byte-level BPE trained by `tokenizers`), each with
                            the ids transformers' AutoTokenizer gives every shipped CoNaLa row (ids.parquet)

The BART-family weights are trained briefly (see train_briefly) so outputs are varied tokens and every
parameter matters. Usage: python3 scripts/make_family_fixtures.py [tests/fixtures]
"""
import copy
import glob
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    MBartConfig,
    MBartForConditionalGeneration,
    PLBartConfig,
    PLBartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

VOCAB = 64
BART_SHAPE = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# Language codes of the mBART-50 / PLBART fixtures.
MBART_LANG, PLBART_LANG = 60, 61


def train_briefly(model, kind, seed, steps=700, lr=3e-3):
    """A few hundred AdamW steps of copying the input, in the family's target format, so greedy and beam
    outputs are varied, input-dependent tokens (a random BART repeats one token: its tied embeddings
    reinforce the last one), and every bias and norm moves off its init. BART's targets are
    `<s> X </s>` (its first token is forced to `<s>`), mBART-50's `lang X </s>` (the language code
    forced first), PLBART's `X </s> lang` (the decoder starts from the language code)."""
    pad, eos, bos = special(model)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    for _ in range(steps):
        n = torch.randint(3, 20, (16,), generator=g)
        width = int(n.max()) + 3
        ids = torch.full((16, width), pad)
        labels = torch.full((16, width), -100)
        mask = torch.zeros_like(ids)
        for i, k in enumerate(n.tolist()):
            x = torch.randint(4, 58, (k,), generator=g).tolist()
            row = [bos] + x + [eos]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            tgt = {"bart": [bos] + x + [eos], "mbart": [MBART_LANG] + x + [eos], "plbart": x + [eos, PLBART_LANG]}[kind]
            labels[i, : len(tgt)] = torch.tensor(tgt)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    # A buffer training leaves alone.
    with torch.no_grad():
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g) * 0.3)


def untie_lm_head(model, cfg):
    """transformers 5 ties lm_head to `shared` at construction; give a T5-family model its own output
    layer (as untied Hub checkpoints have) and keep it out of the tied-weights mapping."""
    model.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, std=cfg.initializer_factor)
    model.all_tied_weights_keys.pop("lm_head.weight", None)


def build_umt5(seed):
    torch.manual_seed(seed)
    cfg = UMT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        initializer_factor=2.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, tie_word_embeddings=False,
    )
    model = UMT5ForConditionalGeneration(cfg)
    untie_lm_head(model, cfg)
    with torch.no_grad():
        model.lm_head.weight[0].mul_(0.0)
        model.lm_head.weight[1].mul_(0.7)
    # Every layer's own position bias, and different from block 0's.
    assert model.encoder.block[1].layer[0].SelfAttention.has_relative_attention_bias
    return model.eval()


def build_bart(kind, seed):
    torch.manual_seed(seed)
    if kind == "bart":
        cfg = BartConfig(**BART_SHAPE, init_std=0.1, decoder_start_token_id=2, forced_eos_token_id=2)
        model = BartForConditionalGeneration(cfg)
        model.generation_config.forced_bos_token_id = 0  # as facebook/bart-* have it
    elif kind == "mbart":
        # mBART-50 style: decoding starts from </s> with the target language code forced first. Here the
        # forced token lives in config.json only (older uploads have no generation_config.json).
        cfg = MBartConfig(**BART_SHAPE, init_std=0.02, scale_embedding=True, decoder_start_token_id=2,
                          forced_eos_token_id=2)
        model = MBartForConditionalGeneration(cfg)
        model.generation_config.forced_bos_token_id = MBART_LANG
    else:
        # PLBART: BART's layers; the decoder starts from the target language code.
        cfg = PLBartConfig(**BART_SHAPE, init_std=0.02, scale_embedding=True, forced_eos_token_id=2)
        model = PLBartForConditionalGeneration(cfg)
        model.generation_config.decoder_start_token_id = PLBART_LANG
    train_briefly(model, kind, seed + 1)
    return model


def build_t5(seed):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, initializer_factor=2.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(cfg)
    untie_lm_head(model, cfg)
    with torch.no_grad():
        model.lm_head.weight[0].mul_(0.0)
        model.lm_head.weight[1].mul_(0.7)
    return model.eval()


def special(model):
    c = model.config
    return c.pad_token_id, c.eos_token_id, (c.bos_token_id if c.model_type in ("bart", "mbart", "plbart") else None)


def batch(model, seed):
    pad, eos, bos = special(model)
    lo = 4 if bos is not None else 3
    g = torch.Generator().manual_seed(seed)
    lengths = [25, 7, 16, 3]
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(lo, VOCAB, (n,), generator=g)
        if bos is not None:
            ids[i, 0] = bos
        ids[i, n - 1] = eos
        mask[i, :n] = 1
    dec = torch.randint(lo, VOCAB, (len(lengths), 24), generator=g)
    dec[:, 0] = model.generation_config.decoder_start_token_id if model.generation_config.decoder_start_token_id is not None else bos
    return ids, mask, dec


@torch.no_grad()
def outputs(model, ids, mask, dec):
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    gen = lambda **kw: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, **kw)
    m64 = copy.deepcopy(model).double()
    enc64 = m64.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits64 = m64(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    return {
        "encoder_hidden": enc.float().contiguous(),
        "logits": logits.float().contiguous(),
        "encoder_hidden_f64": enc64.contiguous(),
        "logits_f64": logits64.contiguous(),
        "greedy": gen(),
        "greedy_rep": gen(repetition_penalty=1.3),
        "beam": gen(num_beams=3),
        "beam_lp": gen(num_beams=3, length_penalty=0.6, early_stopping=True),
        "num_parameters": torch.tensor([model.num_parameters()], dtype=torch.long),
    }


@torch.no_grad()
def bf16_outputs(model, ids, mask, dec, seed):
    """HF in bfloat16 on the same weights: logits, and greedy rows (16 new tokens) in f32 and bf16."""
    _, eos, bos = special(model)
    lo = 4 if bos is not None else 3
    g = torch.Generator().manual_seed(seed)
    n = 40
    lengths = torch.randint(3, 20, (n,), generator=g)
    pad = model.config.pad_token_id
    rows = torch.full((n, int(lengths.max())), pad, dtype=torch.long)
    rmask = torch.zeros_like(rows)
    for i, k in enumerate(lengths.tolist()):
        rows[i, :k] = torch.randint(lo, VOCAB, (k,), generator=g)
        if bos is not None:
            rows[i, 0] = bos
        rows[i, k - 1] = eos
        rmask[i, :k] = 1
    b = copy.deepcopy(model).to(torch.bfloat16)
    gen = lambda m: m.generate(input_ids=rows, attention_mask=rmask, max_new_tokens=16, do_sample=False)
    return {
        "logits_bf16": b(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float().contiguous(),
        "rows_input_ids": rows,
        "rows_mask": rmask,
        "greedy_f32": gen(model),
        "greedy_bf16": gen(b),
    }


def check_reload(out, ids, mask, expect):
    again = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = again.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, expect), f"{out}: reloaded model generates differently"


def save(model, out):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    path = os.path.join(out, "config.json")
    cfg = json.load(open(path))
    if cfg["model_type"] in ("t5", "umt5"):
        # As Hub checkpoints have it (transformers 5 keeps `scale_decoder_outputs` instead).
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
    if cfg["model_type"] == "mbart":
        # The legacy layout: generation's token ids in config.json, no generation_config.json.
        gen = json.load(open(os.path.join(out, "generation_config.json")))
        for k in ["decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"]:
            cfg[k] = gen[k]
        os.remove(os.path.join(out, "generation_config.json"))
    json.dump(cfg, open(path, "w"), indent=2)


def family_fixture(root, family, model, seed):
    out = os.path.join(root, "parity", family)
    save(model, out)
    ids, mask, dec = batch(model, seed)
    tensors = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    tensors.update(outputs(model, ids, mask, dec))
    check_reload(out, ids, mask, tensors["greedy"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
    save_file(bf16_outputs(model, ids, mask, dec, seed + 1), os.path.join(out, "bf16.safetensors"))
    print(family, "greedy:", tensors["greedy"][:2].tolist())
    distinct = {tuple(r) for r in tensors["greedy"].tolist()}
    assert len(distinct) == len(tensors["greedy"]), f"{family}: greedy rows are not varied"


def bin_fixture(root):
    """A flan-t5 as PyTorch pickles (what older Hub uploads ship), one file and sharded with an index."""
    model = build_t5(seed=900)
    out = os.path.join(root, "parity", "t5-bin")
    save(model, out)
    os.remove(os.path.join(out, "model.safetensors"))
    sd = model.state_dict()  # tied `shared` / `*.embed_tokens` share one storage in the pickle
    torch.save(sd, os.path.join(out, "pytorch_model.bin"))
    sharded = os.path.join(out, "sharded")
    os.makedirs(sharded, exist_ok=True)
    for f in ["config.json", "generation_config.json"]:
        open(os.path.join(sharded, f), "w").write(open(os.path.join(out, f)).read())
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        # A view with an offset into a larger storage, as torch keeps slices: the reader must honour it.
        shard = {n: sd[n] for n in part}
        torch.save(shard, os.path.join(sharded, fname))
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(sharded, "pytorch_model.bin.index.json"), "w"), indent=2)
    ids, mask, dec = batch(model, 901)
    tensors = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    tensors.update(outputs(model, ids, mask, dec))
    for d in [out, sharded]:
        check_reload(d, ids, mask, tensors["greedy"])
    # An offset view stored on its own: torch writes the whole storage and an offset into it.
    big = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    torch.save({"view": big[1:3, 2:6], "whole": big, "half": big.to(torch.float16), "bf": big.to(torch.bfloat16)},
               os.path.join(out, "views.bin"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
    bad_bin_fixtures(os.path.join(out, "bad"))
    print("t5-bin greedy:", tensors["greedy"][:2].tolist())


class Pwned:
    """Unpickling this runs a shell command: what a malicious .bin does. conala must refuse it unread."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/conala-pwned",))


def bad_bin_fixtures(out):
    """.bin files conala must refuse, naming the file: code in the pickle, a checkpoint that is not a plain
    state dict, and the legacy (pre-zip) format."""
    os.makedirs(out, exist_ok=True)
    torch.save({"shared.weight": torch.zeros(2, 2), "x": Pwned()}, os.path.join(out, "code.bin"))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, os.path.join(out, "nested.bin"))
    torch.save({"w": torch.zeros(2)}, os.path.join(out, "legacy.bin"), _use_new_zipfile_serialization=False)


def peft_bart_fixture(root):
    """BART with PEFT's default LoRA targets for it (q_proj, v_proj): loss, gradients, weights after 5 AdamW
    steps, greedy outputs with the trained adapter."""
    from peft import LoraConfig, get_peft_model

    out = os.path.join(root, "parity", "peft-bart")
    model = build_bart("bart", seed=1234)
    save(model, os.path.join(out, "base"))
    ids, mask, _ = batch(model, 42)
    g = torch.Generator().manual_seed(43)
    labels = torch.randint(4, VOCAB, (ids.shape[0], 9), generator=g)
    labels[:, -1] = 2
    labels[1, 5:] = -100
    labels[3, 3:] = -100
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(model, cfg)
    targets = sorted(peft_model.peft_config["default"].target_modules)
    assert targets == ["q_proj", "v_proj"], targets
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    peft_model.save_pretrained(os.path.join(out, "adapter_init"))
    peft_model.train()
    loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    opt.zero_grad()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = {n.replace(".default", ""): p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.save_pretrained(os.path.join(out, "adapter_trained"))
    peft_model.eval()
    with torch.no_grad():
        greedy = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
        merged = peft_model.merge_and_unload()
        greedy_merged = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(greedy, greedy_merged)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels, "losses": torch.tensor(losses),
               "greedy_trained": greedy}
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"after.{k}": v for k, v in after.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
    print("peft-bart losses:", losses)


def conala_texts():
    """The texts the shipped plans tokenize, from every shipped CoNaLa row: `intent\\nsnippet` and the
    rewritten intent (where there is one)."""
    texts = []
    for f in sorted(glob.glob("data/conala/**/*.parquet", recursive=True)):
        for r in pq.read_table(f).to_pylist():
            intent, snippet = r.get("intent"), r.get("snippet")
            if intent is not None and snippet is not None:
                texts.append(f"{intent}\n{snippet}")
            if r.get("rewritten_intent"):
                texts.append(r["rewritten_intent"])
    return texts


def tokenizer_fixtures(root):
    import sentencepiece as spm
    from tokenizers import ByteLevelBPETokenizer

    texts = conala_texts()
    base = os.path.join(root, "tokenizers")
    # SentencePiece, as T5 / UL2 repos ship it (spiece.model only); T5's tokenizer class reads it.
    sp_dir = os.path.join(base, "sentencepiece")
    os.makedirs(sp_dir, exist_ok=True)
    corpus = os.path.join(base, "corpus.txt")
    open(corpus, "w").write("\n".join(t.replace("\n", " ") for t in texts))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(sp_dir, "spiece"), vocab_size=1000, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
    )
    os.remove(os.path.join(sp_dir, "spiece.vocab"))
    json.dump({"model_type": "t5", "vocab_size": 1100}, open(os.path.join(sp_dir, "config.json"), "w"))
    # Byte-level BPE, as CodeT5 / BART repos ship it (vocab.json + merges.txt, a RoBERTa tokenizer).
    bpe_dir = os.path.join(base, "bpe")
    os.makedirs(bpe_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1200, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(bpe_dir)
    json.dump({"tokenizer_class": "RobertaTokenizer"}, open(os.path.join(bpe_dir, "tokenizer_config.json"), "w"))
    json.dump({"model_type": "t5", "vocab_size": 1200}, open(os.path.join(bpe_dir, "config.json"), "w"))
    os.remove(corpus)
    for d in [sp_dir, bpe_dir]:
        tok = AutoTokenizer.from_pretrained(d)
        assert not os.path.exists(os.path.join(d, "tokenizer.json"))
        ids = [tok(t)["input_ids"] for t in texts]
        table = pa.table({"text": texts, "ids": pa.array(ids, type=pa.list_(pa.int32()))})
        pq.write_table(table, os.path.join(d, "ids.parquet"), compression="zstd")
        print(d, type(tok).__name__, len(tok), "first:", ids[0][:12])


def main(root):
    family_fixture(root, "umt5", build_umt5(seed=300), seed=301)
    family_fixture(root, "bart", build_bart("bart", seed=400), seed=401)
    family_fixture(root, "mbart", build_bart("mbart", seed=500), seed=501)
    family_fixture(root, "plbart", build_bart("plbart", seed=610), seed=601)
    bin_fixture(root)
    peft_bart_fixture(root)
    tokenizer_fixtures(root)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
