"""Parity fixtures for conala's T5: tiny random models made by HF transformers, with HF's outputs.

Run by hand (pip install torch transformers peft safetensors); writes tests/fixtures/parity/<family>/:
  config.json, model.safetensors      the model as transformers saves it
  io.safetensors                      inputs and HF's outputs:
    input_ids, attention_mask         a right-padded batch of different lengths
    decoder_input_ids                 24 decoder tokens (exercises the decoder's log-spaced buckets)
    encoder_hidden                    encoder last hidden state
    logits                            teacher-forced decoder logits
    *_f64                             the same computed in float64 (the exact answer both round)
    greedy, greedy_rep                generate(max_new_tokens=32), without / with repetition_penalty=1.3
    beam, beam_lp                     num_beams=3 (length_penalty 1.0 / 0.6 + early_stopping)
    buckets_bi, buckets_uni           _relative_position_bucket over relative positions -300..299
and tests/fixtures/parity/peft/ (a LoRA fixture made with PEFT; see make_peft_fixture).

Families: t5 (relu, tied), flan-t5 (gated-gelu, untied), ul2 (gated-silu, untied). The init is scaled
(initializer_factor) so greedy outputs are varied tokens, not all pad/eos.

Usage: python3 scripts/make_parity_fixtures.py tests/fixtures/parity
"""
import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

FAMILIES = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "ul2": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}


def tiny_config(family: str) -> T5Config:
    return T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        initializer_factor=2.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **FAMILIES[family],
    )


def build(family: str, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = T5ForConditionalGeneration(cfg)
    tied = FAMILIES[family]["tie_word_embeddings"]  # T5Config itself now always says True
    if not tied:
        # transformers 5 ties lm_head to `shared` at construction even when tie_word_embeddings is
        # false; give the model its own output layer and drop it from the tied-weights mapping.
        model.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        torch.nn.init.normal_(model.lm_head.weight, std=cfg.initializer_factor)
        # transformers 5 keeps the expanded mapping in `all_tied_weights_keys` (used by save_pretrained
        # and tie_weights); without this the fresh lm_head would be dropped when saving.
        model.all_tied_weights_keys.pop("lm_head.weight", None)
        assert model.lm_head.weight is not model.shared.weight
    # Keep greedy outputs informative: pad is never the best token, and `</s>` only sometimes.
    with torch.no_grad():
        out = model.shared if tied else model.lm_head
        out.weight[0].mul_(0.0)
        out.weight[1].mul_(0.7)
    model.eval()
    return model


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [25, 7, 16, 3]
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = torch.randint(3, 64, (n - 1,), generator=g)
        ids[i, n - 1] = 1  # </s>
        mask[i, :n] = 1
    dec = torch.randint(3, 64, (len(lengths), 24), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


@torch.no_grad()
def outputs(model, ids, mask, dec):
    enc = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    gen = lambda **kw: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, **kw)
    # The same model in float64: the exact answer that float32 implementations (HF's and ours) round.
    m64 = copy.deepcopy(model).double()
    enc64 = m64.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
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
    }


def buckets():
    rel = torch.arange(-300, 300)
    return {
        "buckets_bi": T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128),
        "buckets_uni": T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128),
    }


def save_model(model, out: str, tied: bool) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    # transformers 5 forces tie_word_embeddings=True in T5Config and keeps the scaling choice in
    # `scale_decoder_outputs`; write the flag explicitly, as Hub checkpoints have it.
    cfg["tie_word_embeddings"] = tied
    cfg.pop("scale_decoder_outputs", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def check_reload(out: str, ids, mask, expect) -> None:
    again = T5ForConditionalGeneration.from_pretrained(out).eval()
    if not again.config.scale_decoder_outputs:
        assert again.lm_head.weight is not again.shared.weight, f"{out}: lm_head was tied on reload"
    with torch.no_grad():
        got = again.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, expect), f"{out}: reloaded model generates differently"


def main(root: str) -> None:
    for i, family in enumerate(FAMILIES):
        model = build(family, seed=100 + i)
        ids, mask, dec = batch(seed=7 + i)
        out = os.path.join(root, family)
        save_model(model, out, FAMILIES[family]["tie_word_embeddings"])
        tensors = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
        tensors.update(outputs(model, ids, mask, dec))
        tensors.update(buckets())
        check_reload(out, ids, mask, tensors["greedy"])
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
        print(family, "greedy:", tensors["greedy"].tolist())
    make_peft_fixture(os.path.join(root, "peft"))


def make_peft_fixture(out: str) -> None:
    """A flan-t5 fixture with PEFT: loss and LoRA gradients on a batch, adapter weights after 5 AdamW
    steps, and greedy outputs with a trained adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1234)
    model = build("flan-t5", seed=1234)
    base_dir = os.path.join(out, "base")
    save_model(model, base_dir, False)
    ids, mask, _ = batch(seed=42)
    g = torch.Generator().manual_seed(43)
    labels = torch.randint(3, 64, (ids.shape[0], 9), generator=g)
    labels[:, -1] = 1
    labels[1, 5:] = -100  # a shorter target: padding ignored by the loss
    labels[3, 3:] = -100
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(model, cfg)
    # Non-zero B so gradients of A are not zero at step 0.
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
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels, "losses": torch.tensor(losses), "greedy_trained": greedy}
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"after.{k}": v for k, v in after.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
    print("peft losses:", losses)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
