"""Time metrics.py against the reference libraries on 10,000 generated report pairs (same run).

    python bench/metrics.py [--pairs 10000] [--no-meteor]

METEOR first (so that its memory is measured on a fresh process): lib/meteor.py against pycocoevalcap's
Java METEOR 1.5, each loading its data (the jar: JVM start, WordNet, paraphrase table), then scoring
the same --pairs report pairs of tests/test_meteor.varied_pairs (PTB tokens of normalize_word text,
as eval_caption.py). Peak memory: our process's VmHWM growth, and the java process's VmHWM.
"""
import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from lib import meteor  # noqa: E402
import metrics as M  # noqa: E402
from test_meteor import varied_pairs  # noqa: E402
from test_metrics import _generated  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def reference_scores(refs, preds):
    """The official pipeline: PTBTokenizer + Bleu, rouge 1.0.1, nltk BLEU."""
    from nltk.translate.bleu_score import sentence_bleu
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from rouge import Rouge

    times = {}
    tok = PTBTokenizer()
    t = time.perf_counter()
    gts = tok.tokenize({i: [{"caption": r[0]}] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    Bleu(4).compute_score(gts, res, verbose=0)
    times["corpus_bleu"] = time.perf_counter() - t
    norm = [(M.normalize_word(r[0]), M.normalize_word(p)) for r, p in zip(refs, preds)]
    rouge = Rouge()
    _, times["rouge"] = timed(lambda: [rouge.get_scores(p, r) for r, p in norm if r and p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = [(1, 0, 0, 0), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
        _, times["sentence_bleu"] = timed(
            lambda: [sentence_bleu([r.split()], p.split(), weights=w) for r, p in norm for w in weights])
    return times


def ours_scores(refs, preds):
    return {name: timed(lambda f=f: f(refs, preds))[1] for name, f in
            [("corpus_bleu", M.corpus_bleu), ("rouge", M.rouge), ("sentence_bleu", M.sentence_bleu)]}


def peak_mib(pid="self", field="VmHWM"):
    """A process's peak (VmHWM) or current (VmRSS) resident memory in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def meteor_bench(n):
    from pycocoevalcap.meteor.meteor import Meteor
    data = meteor.meteor_data()
    if data.folder is None:
        print("METEOR: no METEOR data found (pycocoevalcap not installed?): skipped")
        return
    pairs = varied_pairs(n, seed=1)
    refs = [[M.ptb_tokenize(M.normalize_word(r))] for r, _ in pairs]
    hyps = [M.ptb_tokenize(M.normalize_word(p)) for _, p in pairs]
    words = sum(len(h.split()) + len(r[0].split()) for r, h in zip(refs, hyps)) / n
    print(f"METEOR 1.5 on {n} report pairs ({words:.0f} PTB tokens per pair)")
    base = peak_mib(field="VmRSS")
    _, t_load = timed(lambda: (data.paraphrases, data.synsets, data.function_words, data.prefixes))
    mem_load = peak_mib() - base
    stats, t_score = timed(lambda: [meteor.segment_stats(r, h, data) for r, h in zip(refs, hyps)])
    ours, mem_all = meteor.corpus_score(stats), peak_mib() - base
    t = time.perf_counter()
    jar = Meteor()
    jar._stat("a", ["a"])  # the jar answers once it has loaded its data
    j_load = time.perf_counter() - t
    (java, _), j_score = timed(lambda: jar.compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}))
    j_mem = peak_mib(jar.meteor_p.pid)
    print(f"  load data     ours {t_load:6.2f} s   jar {j_load:6.2f} s (JVM start included)")
    print(f"  score pairs   ours {t_score:6.2f} s   jar {j_score:6.2f} s   jar / ours x{j_score / t_score:.2f}")
    print(f"  peak memory   ours {mem_all:6.0f} MiB (growth of this process; {mem_load:.0f} after loading)   "
          f"jar {j_mem:6.0f} MiB (java process)")
    print(f"  corpus score  ours {ours:.6f}   jar {java:.6f}   difference {ours - java:+.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--no-meteor", action="store_true", help="skip the METEOR comparison (needs Java)")
    args = parser.parse_args()
    if not args.no_meteor:
        meteor_bench(args.pairs)
    pairs = _generated(args.pairs, seed=1)
    refs, preds = [[r] for r, _ in pairs], [p for _, p in pairs]
    words = sum(len(p.split()) + len(r[0].split()) for r, p in zip(refs, preds)) / len(pairs)
    print(f"{len(pairs)} report pairs, {words:.0f} words per pair")
    ours, theirs = ours_scores(refs, preds), reference_scores(refs, preds)
    for name in ours:
        print(f"{name:14s} ours {ours[name]:7.2f} s   reference {theirs[name]:7.2f} s   "
              f"speed-up x{theirs[name] / ours[name]:.1f}")
    total_o, total_r = sum(ours.values()), sum(theirs.values())
    print(f"{'total':14s} ours {total_o:7.2f} s   reference {total_r:7.2f} s   speed-up x{total_r / total_o:.1f}")


if __name__ == "__main__":
    main()
