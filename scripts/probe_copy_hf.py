# Can a from-scratch `mini` T5 learn to copy on the curated split? HF transformers probe behind the
# README's note on the offline default's BLEU. Run from the repository root, e.g.
#   python3 scripts/probe_copy_hf.py --task copy --steps 2000
#   python3 scripts/probe_copy_hf.py --task aug --steps 1500 --tok /tmp/tok1k.json  (conala tokenizer train --vocab-size 1000)
# --task real: the rewrite task; copy: intent\nsnippet -> intent; multi/aug: half the rows copy (intents / random word spans).
import sys, time, random, torch, pyarrow.parquet as pq, sacrebleu, argparse
from transformers import T5ForConditionalGeneration, T5Config, PreTrainedTokenizerFast, get_linear_schedule_with_warmup
ap = argparse.ArgumentParser()
ap.add_argument('--steps', type=int, default=600); ap.add_argument('--lr', type=float, default=3e-3)
ap.add_argument('--task', default='real')  # real | copy | multi
ap.add_argument('--d', type=int, default=128); ap.add_argument('--layers', type=int, default=3)
ap.add_argument('--ff', type=int, default=512); ap.add_argument('--heads', type=int, default=4)
ap.add_argument('--drop', type=float, default=0.1); ap.add_argument('--bs', type=int, default=32)
ap.add_argument('--copyfrac', type=float, default=0.5); ap.add_argument('--tok', default='data/tokenizer/conala-unigram-8k.json')
a = ap.parse_args()
torch.manual_seed(0); torch.set_num_threads(2)
tok = PreTrainedTokenizerFast(tokenizer_file=a.tok, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
cfg = T5Config(vocab_size=tok.vocab_size if len(tok) < tok.vocab_size else len(tok), d_model=a.d, d_kv=a.d//a.heads, d_ff=a.ff, num_layers=a.layers, num_heads=a.heads,
               dropout_rate=a.drop, feed_forward_proj='relu', tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
m = T5ForConditionalGeneration(cfg)
t = pq.read_table('data/conala/curated/train/0000.parquet').to_pylist()
t = [r for r in t if r['rewritten_intent'] and r['intent']]
words = [w for r in t for w in (r['intent'] + ' ' + r['rewritten_intent']).split()]
def pair(r, rng):
    if a.task == 'aug' and rng.random() < a.copyfrac:
        n = rng.randint(2, 16); i = rng.randrange(len(words) - n)
        span = ' '.join(words[i:i + n])
        return span + '\n' + rng.choice(t)['snippet'], span
    if a.task == 'copy' or (a.task == 'multi' and rng.random() < a.copyfrac):
        return r['intent'] + '\n' + r['snippet'], r['intent']
    return r['intent'] + '\n' + r['snippet'], r['rewritten_intent']
def enc(pairs):
    x = tok([p[0] for p in pairs], max_length=128, truncation=True, padding=True, return_tensors='pt')
    y = tok([p[1] for p in pairs], max_length=64, truncation=True, padding=True, return_tensors='pt').input_ids
    y[y == 0] = -100
    return x, y
opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.01)
sch = get_linear_schedule_with_warmup(opt, 60, a.steps)
rng = random.Random(0); m.train(); t0 = time.time()
for s in range(1, a.steps + 1):
    b = [pair(r, rng) for r in rng.sample(t, a.bs)]; x, y = enc(b)
    loss = m(**x, labels=y).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sch.step(); opt.zero_grad()
    if s % 100 == 0: print(s, round(loss.item(), 3), round(time.time() - t0), flush=True)
m.eval()
te = [r for r in pq.read_table('data/conala/curated/test/0000.parquet').to_pylist() if r['rewritten_intent'] and r['intent']][:200]
x, _ = enc([(r['intent'] + '\n' + r['snippet'], '') for r in te])
with torch.no_grad(): out = m.generate(**x, max_new_tokens=64, num_beams=1)
pred = tok.batch_decode(out, skip_special_tokens=True)
print(vars(a))
print('BLEU vs rewritten', round(sacrebleu.corpus_bleu(pred, [[r['rewritten_intent'] for r in te]]).score, 2),
      'vs intent', round(sacrebleu.corpus_bleu(pred, [[r['intent'] for r in te]]).score, 2),
      'copy baseline', round(sacrebleu.corpus_bleu([r['intent'] for r in te], [[r['rewritten_intent'] for r in te]]).score, 2))
for p, r in list(zip(pred, te))[:4]: print(repr(p), '|', repr(r['intent']), '|', repr(r['rewritten_intent']))
