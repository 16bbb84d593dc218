"""Time metrics.py against the reference libraries on 10,000 generated report pairs (same run).

    python bench/metrics.py [--pairs 10000] [--meteor-java]

--meteor-java also runs pycocoevalcap's Java METEOR 1.5 on the test corpus of tests/test_metrics.py
and prints its gap to our (nltk-equal) METEOR.
"""
import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import metrics as M  # noqa: E402
from test_metrics import PAIRS, _generated  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def reference_scores(refs, preds):
    """The official pipeline: PTBTokenizer + Bleu, rouge 1.0.1, nltk meteor (no synonyms), nltk BLEU."""
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from rouge import Rouge

    class NoSynonyms:
        def synsets(self, word):
            return []

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
    _, times["meteor"] = timed(lambda: [meteor_score([r.split()], p.split(), wordnet=NoSynonyms()) for r, p in norm])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = [(1, 0, 0, 0), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
        _, times["sentence_bleu"] = timed(
            lambda: [sentence_bleu([r.split()], p.split(), weights=w) for r, p in norm for w in weights])
    return times


def ours_scores(refs, preds):
    return {name: timed(lambda f=f: f(refs, preds))[1] for name, f in
            [("corpus_bleu", M.corpus_bleu), ("rouge", M.rouge), ("meteor", M.meteor), ("sentence_bleu", M.sentence_bleu)]}


def meteor_java_gap():
    from pycocoevalcap.meteor.meteor import Meteor
    pairs = [(r, p) for r, p in PAIRS if r.strip() and p.strip()]  # the official RG filter
    tok = __import__("pycocoevalcap.tokenizer.ptbtokenizer", fromlist=["PTBTokenizer"]).PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": M.normalize_word(r)}] for i, (r, _) in enumerate(pairs)})
    res = tok.tokenize({i: [{"caption": M.normalize_word(p)}] for i, (_, p) in enumerate(pairs)})
    java, _ = Meteor().compute_score(gts, res)
    ours = M.meteor([[r] for r, _ in pairs], [p for _, p in pairs])
    print(f"METEOR on {len(pairs)} test pairs: Java METEOR 1.5 {java:.4f}, ours (nltk, no synonyms) {ours:.4f}, "
          f"gap {ours - java:+.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--meteor-java", action="store_true")
    args = parser.parse_args()
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
    if args.meteor_java:
        meteor_java_gap()


if __name__ == "__main__":
    main()
