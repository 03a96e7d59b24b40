"""Reference BLEU values for the unit tests in src/metrics.rs: sacrebleu and the CoNaLa benchmark code.

Run by hand: pip install sacrebleu; python3 scripts/reference_bleu.py
"""
import sacrebleu, re, collections, math
hyps=["Concatenate elements of a list x of multiple integers to a single integer","sort list `l` by key","","hello world, it is 3.5 - or 4-5 &amp; \"quoted\" text", "getValue of dict d"]
refs=["Concatenate elements of a list 'x' of multiple integers to a single integer","sort a list `l` in place","nothing here","hello world , it is 3.5 - or 4 - 5 & \"quoted\" text", "get value of dict `d`"]
print("corpus", repr(sacrebleu.corpus_bleu(hyps,[refs]).score))
print("corpus2", repr(sacrebleu.corpus_bleu(hyps[:2],[refs[:2]]).score))
for h in hyps: print(repr(sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(h)))
def tok(code):
    code = re.sub(r'([^A-Za-z0-9_])', r' \1 ', code)
    code = re.sub(r'([a-z])([A-Z])', r'\1 \2', code)
    code = re.sub(r'\s+', ' ', code)
    code = code.replace('"', '`')
    code = code.replace('\'', '`')
    return [t for t in code.split(' ') if t]
def ngrams(seg, n):
    c=collections.Counter()
    for o in range(1,n+1):
        for i in range(0,len(seg)-o+1): c[tuple(seg[i:i+o])]+=1
    return c
def compute_bleu(rc, tc, max_order=4, smooth=False):
    m=[0]*max_order; p=[0]*max_order; rl=0; tl=0
    for refs_, t in zip(rc, tc):
        rl += min(len(r) for r in refs_); tl += len(t)
        mr=collections.Counter()
        for r in refs_: mr |= ngrams(r, max_order)
        ov = ngrams(t, max_order) & mr
        for g in ov: m[len(g)-1]+=ov[g]
        for o in range(1,max_order+1):
            pm=len(t)-o+1
            if pm>0: p[o-1]+=pm
    pr=[0]*max_order
    for i in range(max_order):
        if smooth: pr[i]=(m[i]+1.)/(p[i]+1.)
        else: pr[i]= m[i]/p[i] if p[i]>0 else 0.0
    geo = math.exp(sum((1./max_order)*math.log(x) for x in pr)) if min(pr)>0 else 0
    ratio = tl/rl if rl else 0
    bp = 1. if ratio>1.0 else (math.exp(1-1./ratio) if ratio>0 else 0)
    return geo*bp
for h,r in zip(hyps,refs):
    print(tok(h), "sent", repr(compute_bleu([[tok(r)]],[tok(h)],smooth=True)))
print("conala corpus", repr(compute_bleu([[tok(r)] for r in refs],[tok(h) for h in hyps])))
