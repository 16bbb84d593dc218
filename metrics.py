"""Uni-Med evaluation metrics, written by hand so that they give the official numbers.

The paper's numbers come from the official scripts (eval_vqa.py, eval_ref.py, eval_identify.py,
eval_caption.py, eval_cls.py, evaluate_metrics.py; spec section 9). They call four libraries; this
file re-implements each one in plain Python and agrees with it to 1e-6 (tests/test_metrics.py;
METEOR: tests/test_meteor.py, to the jar's statistics):

  metric                  reference                                  used for
  normalize_word          evaluate_metrics.py (VQA-API normalisation) every text metric below
  sentence_bleu           nltk sentence_bleu, no smoothing            VQA, REG (BLEU-1..4)
  token_f1, accuracies    the official scripts' own code              VQA, REG, CLS
  corpus_bleu             pycocoevalcap Bleu(4) on PTBTokenizer       RG (report generation)
  rouge                   `rouge` 1.0.1 (pltrdy) get_scores, F         RG
  meteor                  pycocoevalcap Meteor (Java METEOR 1.5)      RG (lib/meteor.py)
  iou, rec_iou            eval_utils.computeIoU (+1 pixel)            REC

Quirks reproduced on purpose, since they define the published numbers (docs/notes.md has each):
at most 32 periods stripped; token F1's true positives count the prediction's repeats; VQA closed
accuracy tests a substring; rouge 1.0.1 counts distinct n-grams; BLEU for reports is corpus-level;
nltk's unsmoothed zero precision; report ROUGE and F1 on text normalised twice; no reversed-box check.

Report generation runs the official route: normalize_word, then PTB tokenisation as pycocoevalcap's
PTBTokenizer (Stanford CoreNLP) does it (lib/ptb.py), then BLEU and METEOR 1.5 (lib/meteor.py, from
the jar's own data files; without them, METEOR's exact and stem modules only, marked METEOR*).
"""
import math
import re
import sys
from collections import Counter

from lib.meteor import corpus_score, meteor_data, segment_stats
from lib.ptb import ptb_tokenize

# -----------------------------------------------------------------------------------------------
# 1. Answer normalisation (evaluate_metrics.py, copied from the VQA evaluation API)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
         ",", "?", "!"]
# the official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (typo'd) look-ahead that is
# always true, so it means "a period not followed by a digit"
PERIOD_STRIP = re.compile(r"\.(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
MAX_PERIODS = re.UNICODE  # = 32: the official call passes the flag as `count` (spec section 10)


def normalize_word(text):
    """The official answer normalisation (evaluate_metrics.normalize_word), quirks included."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        # the test looks at the *original* text, the replacement works on the running copy
        out = out.replace(p, "" if p + " " in text or " " + p in text or has_digit_comma else " ")
    out = PERIOD_STRIP.sub("", out, count=MAX_PERIODS)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def clean_prediction(text, task):
    """What the official script of `task` does to a generated answer before scoring it: lower-case,
    remove `<unk>`, strip. eval_ref.py (REC) instead removes `<unk>` and every space, then strips,
    and never lower-cases, so a box written with `<UNK>` in it does not parse there (nor here)."""
    if task == "refer":
        return text.replace("<unk>", "").replace(" ", "").strip()
    return text.lower().replace("<unk>", "").strip()


def _mean(values):
    # the official np.mean of an empty list is nan; we report 0.0 for an empty selection instead
    return math.fsum(values) / len(values) if values else 0.0


# -----------------------------------------------------------------------------------------------
# 2. Closed-set answers: token F1, accuracies (eval_vqa.py, eval_identify.py, eval_cls.py)

def _prf(reference, prediction):
    """Official calculate_f1score on two raw strings -> (precision, recall, f1)."""
    cand = Counter(normalize_word(prediction).split())
    ref = Counter(normalize_word(reference).split())
    # official quirk: a shared word adds its prediction count to tp, however often the reference has it
    tp = sum(c for w, c in cand.items() if w in ref)
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    if tp == 0:  # also when either side has no words
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def token_f1(references, predictions):
    """Mean token precision / recall / F1 (official definition); best reference per sample."""
    _check(references, predictions, "token_f1")
    rows = [max((_prf(r, p) for r in refs), key=lambda s: s[2]) for refs, p in zip(references, predictions)]
    return {"precision": _mean([r[0] for r in rows]), "recall": _mean([r[1] for r in rows]),
            "f1": _mean([r[2] for r in rows])}


def exact_match(references, predictions):
    """REG / CLS accuracy: normalised prediction == normalised reference (any reference)."""
    _check(references, predictions, "exact_match")
    return _mean([float(any(normalize_word(r) == normalize_word(p) for r in refs))
                  for refs, p in zip(references, predictions)])


def closed_accuracy(references, predictions):
    """VQA closed-question accuracy as eval_vqa.py computes it: reference is a substring of prediction."""
    _check(references, predictions, "closed_accuracy")
    return _mean([float(any(normalize_word(r) in normalize_word(p) for r in refs))
                  for refs, p in zip(references, predictions)])


def _check(references, predictions, name):
    if len(references) != len(predictions):
        raise ValueError(f"{name}: {len(references)} reference lists but {len(predictions)} predictions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"{name}: references[{i}] must be a non-empty list of strings, got {refs!r}")


# -----------------------------------------------------------------------------------------------
# 3. Sentence BLEU (nltk.translate.bleu_score.sentence_bleu, no smoothing), for VQA and REG

BLEU_WEIGHTS = {"bleu1": (1.0, 0.0, 0.0, 0.0), "bleu2": (0.5, 0.5), "bleu3": (1 / 3,) * 3, "bleu4": (0.25,) * 4}


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _sentence_bleu(refs, hyp):
    """All four BLEU-n of one hypothesis token list against its reference token lists."""
    zero = {k: 0.0 for k in BLEU_WEIGHTS}
    precisions = []
    for n in range(1, 5):
        counts = _ngrams(hyp, n)
        best = Counter()
        for ref in refs:
            best |= _ngrams(ref, n)  # | keeps the max count per n-gram
        matched = sum(min(c, best[g]) for g, c in counts.items())
        if n == 1 and matched == 0:
            return zero  # nltk: no unigram overlap -> BLEU is 0 for every order
        # nltk method0: a zero precision becomes the smallest float, so log() stays finite
        precisions.append(matched / max(1, sum(counts.values())) if matched else sys.float_info.min)
    hyp_len = len(hyp)
    ref_len = min((len(r) for r in refs), key=lambda L: (abs(L - hyp_len), L))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return {k: bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(ws, precisions)))
            for k, ws in BLEU_WEIGHTS.items()}


def sentence_bleu(references, predictions):
    """Mean per-sample BLEU-1..4 on normalize_word tokens (eval_vqa.py / eval_identify.py)."""
    _check(references, predictions, "sentence_bleu")
    rows = [_sentence_bleu([normalize_word(r).split() for r in refs], normalize_word(p).split())
            for refs, p in zip(references, predictions)]
    return {k: _mean([row[k] for row in rows]) for k in BLEU_WEIGHTS}


# -----------------------------------------------------------------------------------------------
# 4. Corpus BLEU (pycocoevalcap) on PTB tokens (ptb.py), for report generation

def _all_ngrams(tokens, n=4):
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _bleu_stats(refs, hyp, n=4):
    """pycocoevalcap cook_refs + cook_test for one sample -> (testlen, reflen, guess, correct)."""
    hyp_len = len(hyp)
    best = _all_ngrams(refs[0], n)
    for ref in refs[1:]:
        best |= _all_ngrams(ref, n)  # | keeps the max count per n-gram
    correct = [0] * n
    for g, c in _all_ngrams(hyp, n).items():
        m = best.get(g)
        if m:
            correct[len(g) - 1] += m if m < c else c
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in refs)[1]  # "closest"
    return hyp_len, ref_len, [max(0, hyp_len - k + 1) for k in range(1, n + 1)], correct


def corpus_bleu(references, predictions):
    """pycocoevalcap Bleu(4).compute_score on PTB-tokenised texts -> corpus BLEU-1..4."""
    _check(references, predictions, "corpus_bleu")
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's constants: 0 matches still give ~0, never 0/0
    stats = [_bleu_stats([ptb_tokenize(x).split() for x in refs], ptb_tokenize(pred).split())
             for refs, pred in zip(references, predictions)]  # (testlen, reflen, guess, correct) per sample
    test_len, ref_len = sum(s[0] for s in stats), sum(s[1] for s in stats)  # corpus-level: summed
    guess, correct = [sum(s[2][k] for s in stats) for k in range(4)], [sum(s[3][k] for s in stats) for k in range(4)]
    scores, bleu = {}, 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    for k in range(4):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
        score = bleu ** (1.0 / (k + 1))
        scores[f"bleu{k + 1}"] = score * math.exp(1 - 1 / ratio) if ratio < 1 else score
    return scores


# -----------------------------------------------------------------------------------------------
# 5. ROUGE: the `rouge` 1.0.1 package the official script uses, and rouge-score's definition

def _rouge_sentences(text):
    # rouge 1.0.1: split on ".", keep non-empty pieces, collapse spaces; a piece of only spaces
    # becomes "" and contributes an empty-string word (reproduced)
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def _lcs_words(x, y):
    """Words of the LCS of x and y, traced back exactly like rouge 1.0.1's _recon_lcs."""
    if not set(x).intersection(y):
        return []
    table = [[0] * (len(y) + 1)]
    for xi in x:
        prev, row = table[-1], [0]
        for j, yj in enumerate(y):
            if xi == yj:
                row.append(prev[j] + 1)
            else:
                up, left = prev[j + 1], row[j]
                row.append(up if up > left else left)
        table.append(row)
    i, j, words = len(x), len(y), []
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _f(overlap, hyp_count, ref_count):
    p = overlap / hyp_count if hyp_count else 0.0
    r = overlap / ref_count if ref_count else 0.0
    return 2.0 * ((p * r) / (p + r + 1e-8))


def _rouge_pltrdy(reference, prediction):
    """rouge 1.0.1 Rouge().get_scores(prediction, reference)[0][m]["f"] for rouge-1/2/l."""
    hyp_s, ref_s = _rouge_sentences(prediction), _rouge_sentences(reference)
    if not hyp_s or not ref_s:
        raise ValueError(f"rouge: empty hypothesis or reference ({prediction!r}, {reference!r})")
    hyp_w = [w for s in hyp_s for w in s.split(" ")]
    ref_w = [w for s in ref_s for w in s.split(" ")]
    out = {}
    for n in (1, 2):  # distinct n-grams over the flattened words (sentence borders ignored)
        h, r = set(_ngrams(hyp_w, n)), set(_ngrams(ref_w, n))
        out[f"rouge{n}"] = _f(len(h & r), len(h), len(r))
    union = set()  # summary-level ROUGE-L: distinct words in the union of per-sentence LCSs
    for rs in ref_s:
        rw = rs.split(" ")
        for hs in hyp_s:
            union.update(_lcs_words(rw, hs.split(" ")))
    out["rougeL"] = _f(len(union), len(set(hyp_w)), len(set(ref_w)))
    return out


def _best_rouge(score_pair, references, predictions):
    """Mean over samples of each ROUGE F (the best over a sample's references) on normalize_word texts,
    dropping the samples the official rouge loop skips."""
    rows = []
    for refs, pred in zip(references, predictions):
        p, rs = normalize_word(pred), [r for r in (normalize_word(r) for r in refs) if r]
        if p and rs:
            rows.append([score_pair(r, p) for r in rs])
    return {m: _mean([max(s[m] for s in row) for row in rows]) for m in ("rouge1", "rouge2", "rougeL")}


def rouge(references, predictions):
    """Mean rouge 1.0.1 F-scores on normalize_word texts (eval_caption.calculate_rouge).

    Samples whose normalised prediction or reference is empty are skipped, as officially.
    With several references the best F per metric counts (the official data has one).
    """
    _check(references, predictions, "rouge")
    return _best_rouge(_rouge_pltrdy, references, predictions)


# -----------------------------------------------------------------------------------------------
# 6. METEOR: pycocoevalcap's Meteor, i.e. Java METEOR 1.5, re-implemented in lib/meteor.py

def meteor(references, predictions, data=None):
    """Corpus METEOR 1.5 as eval_caption.py gets it from pycocoevalcap's Meteor: the texts are
    normalize_word'ed, PTB-tokenised and scored by the jar (`-l en -norm`), whose EVAL line sums the
    samples' statistics and scores the sum once. `data`: a meteor.MeteorData, by default the one
    meteor.meteor_data() finds (without data files: the exact+stem fallback, see lib/meteor.py)."""
    _check(references, predictions, "meteor")
    data = data or meteor_data()
    return corpus_score([segment_stats([ptb_tokenize(normalize_word(r)) for r in refs],
                                       ptb_tokenize(normalize_word(p)), data)
                         for refs, p in zip(references, predictions)])


# -----------------------------------------------------------------------------------------------
# 7. Boxes (eval_ref.py, eval_utils.computeIoU)

def iou(box_a, box_b, pixel_inclusive=True):
    """IoU of two (x1, y1, x2, y2) pixel boxes, with the arithmetic of the official computeIoU.

    pixel_inclusive=True is the official convention (coordinates name pixels, so a box spans
    x2 - x1 + 1 of them); False gives the continuous-geometry IoU. Like computeIoU, there is no
    check for a reversed box (x2 < x1 or y2 < y1): its side x2 - x1 + 1 stays positive when it is
    reversed by less than a pixel, so it still overlaps a little, and a box reversed in both
    directions has a positive area. The official numbers include such boxes, so we keep the formula.
    Only a zero union, where computeIoU would divide by zero and stop, scores 0 here.
    """
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = box_a, box_b
    e = 1 if pixel_inclusive else 0
    inter = max(0, min(ax2, bx2) - max(ax1, bx1) + e) * max(0, min(ay2, by2) - max(ay1, by1) + e)
    union = (ax2 - ax1 + e) * (ay2 - ay1 + e) + (bx2 - bx1 + e) * (by2 - by1 + e) - inter
    return inter / union if union != 0 else 0.0


def grid_to_pixels(grid_box, image_size, res=100.0):
    """(x1, y1, x2, y2) on the 0-res grid -> pixels of the original (W, H) image, as eval_ref.py scales."""
    (w, h), (x1, y1, x2, y2) = image_size, grid_box
    return x1 / res * w, y1 / res * h, x2 / res * w, y2 / res * h


def rec_iou(pred_grid_box, gt_xywh, image_size, res=100.0, pixel_inclusive=True):
    """IoU of a parsed prediction on the 0-res grid (or None: unparsable -> 0) against a pixel [x,y,w,h]."""
    if pred_grid_box is None:
        return 0.0
    pred = grid_to_pixels(pred_grid_box, image_size, res)
    gx, gy, gw, gh = gt_xywh
    return iou(pred, (gx, gy, gx + gw, gy + gh), pixel_inclusive)


def recall_at(ious, threshold=0.5):
    """R@threshold: the share of samples whose IoU is strictly above the threshold (official `>`)."""
    return _mean([float(v > threshold) for v in ious])


# -----------------------------------------------------------------------------------------------
# 8. Scoring a dataset as the official eval_<task>.py scripts do (evaluate.py and the command line)
#
# A record is one scored sample: prediction (cleaned, see clean_prediction), reference, and where the
# task needs them answer_type (VQA), box [x, y, w, h] / image_size [W, H] / pred_box (REC).

def is_closed(answer_type):
    # Slake labels questions OPEN / CLOSED; data.py maps Path-VQA's "yes/no" to CLOSED, as eval_vqa.py does
    return str(answer_type).upper() == "CLOSED"


def score_sample(task, r):
    """Per-sample scores written next to each prediction, for reading (the tables use score_dataset)."""
    refs, preds = [[r["reference"]]], [r["prediction"]]
    if task == "refer":
        iou_ = rec_iou(r["pred_box"], r["box"], r["image_size"])
        return {"iou": iou_, "hit": iou_ > 0.5}
    if task == "caption":
        if not r["prediction"] or not r["reference"]:
            return {"dropped": True}  # the RG metrics skip empty pairs, as eval_caption.py does
        once_refs, once_preds = _normalised_once(refs, preds)  # see score_dataset
        return {**rouge(once_refs, once_preds), "f1": token_f1(once_refs, once_preds)["f1"],
                "meteor": meteor(refs, preds)}
    if task == "cls":
        return {"acc": exact_match(refs, preds)}
    scores = {"bleu1": sentence_bleu(refs, preds)["bleu1"], "f1": token_f1(refs, preds)["f1"]}
    if task == "vqa":
        scores["contains"] = closed_accuracy(refs, preds)
    else:
        scores["acc"] = exact_match(refs, preds)
    return scores


def _percent(scores):
    return {k: 100.0 * v for k, v in scores.items()}


def _text_scores(records):
    """Sentence BLEU-1..4 and token F1, averaged over samples (VQA, REG, QA); None when empty."""
    if not records:
        return dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "f1"))
    refs, preds = [[r["reference"]] for r in records], [r["prediction"] for r in records]
    return _percent({**sentence_bleu(refs, preds), "f1": token_f1(refs, preds)["f1"]})


def _normalised_once(references, predictions):
    return [[normalize_word(r) for r in refs] for refs in references], [normalize_word(p) for p in predictions]


def score_dataset(task, records):
    """The metrics of one dataset, in percent (the paper's unit), as the official script of its task
    computes them."""
    if not records:
        return {}
    if task == "refer":  # eval_ref.py: an unparsable answer has IoU 0 (no reference text needed)
        ious = [rec_iou(r["pred_box"], r["box"], r["image_size"]) for r in records]
        return {"iou": 100.0 * _mean(ious), "r@0.5": 100.0 * recall_at(ious)}
    refs, preds = [[r["reference"]] for r in records], [r["prediction"] for r in records]
    if task == "vqa":  # eval_vqa.py: all, open and closed subsets; "accuracy" on closed only
        closed = [r for r in records if is_closed(r.get("answer_type"))]
        opened = [r for r in records if not is_closed(r.get("answer_type"))]
        out = _text_scores(records)
        out.update({f"open_{k}": v for k, v in _text_scores(opened).items()})
        out.update({f"closed_{k}": v for k, v in _text_scores(closed).items()})
        out["closed_acc"] = 100.0 * closed_accuracy(
            [[r["reference"]] for r in closed], [r["prediction"] for r in closed]) if closed else None
        return out
    if task in ("identify", "qa"):  # eval_identify.py (QA: the same, not in the paper)
        return {**_text_scores(records), "acc": 100.0 * exact_match(refs, preds)}
    if task == "cls":  # eval_cls.py
        return {"acc": 100.0 * exact_match(refs, preds)}
    if task == "caption":  # eval_caption.py: empty predictions or references are dropped first
        kept = [r for r in records if r["prediction"] and r["reference"]]
        refs, preds = [[r["reference"]] for r in kept], [r["prediction"] for r in kept]
        if not kept:
            return {**dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge1", "rouge2",
                                     "rougeL", "f1")), "scored": 0}
        # eval_caption.evaluate_all calls calculate_bleu, calculate_meteor, calculate_rouge and
        # calculate_f1 in this order on the same records, and calculate_meteor overwrites them with
        # normalize_word(prediction) and normalize_word(reference). So BLEU scores the raw texts,
        # METEOR normalises once, and ROUGE and F1, which normalise again, see the text normalised
        # twice. normalize_word is not idempotent (it strips at most 32 periods a pass, and a word
        # freed of its period may then map, "none." -> "none" -> "0"), so we pass them the once-
        # normalised texts, which they normalise again.
        once_refs, once_preds = _normalised_once(refs, preds)
        return {**_percent(corpus_bleu(refs, preds)), "meteor": 100.0 * meteor(refs, preds),
                **_percent(rouge(once_refs, once_preds)), "f1": 100.0 * token_f1(once_refs, once_preds)["f1"],
                "scored": len(kept)}
    raise ValueError(f"no metrics for task {task!r} (vqa, refer, identify, caption, cls, qa)")
