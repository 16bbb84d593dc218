"""metrics.py against the reference libraries the official evaluation calls, to 1e-6.

References (test-only imports): pycocoevalcap Bleu + PTBTokenizer (Java, called once for the whole
corpus), nltk sentence_bleu, rouge 1.0.1. METEOR: tests/test_meteor.py.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metrics as M

TOL = 1e-6

HAND = [  # (reference, prediction): edge cases
    ("The heart size is normal.", "The heart size is normal."),  # identical
    ("no pleural effusion", ""),  # empty prediction
    ("Lungs are clear.", "Osseous structures intact"),  # no overlap
    ("...", "?!"),  # punctuation only
    ("The heart is enlarged.", "..."),
    ("3.5 cm nodule in the right upper lobe, 1,200 mL.", "A 3.5 cm nodule in the right lobe; 1,200 ml"),
    ("There's no pneumothorax and the lungs aren't hyperinflated.", "there is no pneumothorax. lungs are not hyperinflated"),
    ("I can't see it, don't you?", "we cannot see it, dont you"),
    ("left left left lung", "left lung lung lung"),  # repeated words
    ("the the the the", "the the"),
    ("Naïve café résumé: µm-sized lésion, 5°C.", "naive cafe resume: um sized lesion 5 °c"),  # unicode
    ("Left-sided PICC line (tip at the cavoatrial junction) is unchanged.", "left sided picc line [tip at cavoatrial junction] unchanged"),
    ('"Quoted" text and \'single quotes\' -- with dashes ... and ellipsis', "quoted text - with dashes and ellipsis..."),
    ("Dr. Smith saw the pt. at 10:30 a.m. on 12/05/2020, e.g. U.S. rules.", "dr. smith saw the pt at 10:30 a.m. e.g. us rules"),
    ("one two three four five six seven eight nine ten", "1 2 3 4 5 6 7 8 9 10"),  # number words
    ("yes", "yes"), ("no", "yes"), ("yes", "yes, there is"), ("no", "normal"),
    ("abdomen", "abdomen"), ("liver", "the liver and spleen"), ("ct", "mri"),
    ("T2-weighted MRI shows C3-C4 disc bulge (L>R), s/p CABG.", "t2 weighted mri: c3-c4 disc bulge, status post cabg"),
    ("Approx. 2 cm; cf. prior study.", "approximately 2 cm compared with prior"),
    ("heart", "heart heart heart heart heart"),
    ("a b c d e", "a b c d e f g h"),
    ("x", "x y"),  # hypothesis shorter than n-gram orders
    ("the lung", "lung"),
    ("1. no acute process. 2. stable cardiomegaly.", "1. stable cardiomegaly. 2. no acute process."),
    ("Pt's hx of CHF; r/o PNA w/o contrast.", "patient's history of chf, rule out pna without contrast"),
    ("The U.S.A. and U.K. rules.", "U.S.A. rules"),
    ("It's 50% smaller, +/- 2 mm, ~3x larger, >= 5 units", "its 50 % smaller +/- 2mm about 3x larger >=5 units"),
    ("Sentence one. Sentence two. Sentence three.", "sentence two. sentence one."),
    (" ".join(["no focal consolidation pleural effusion or pneumothorax."] * 30),  # very long reports
     " ".join(["no focal consolidation or pneumothorax is seen heart size normal."] * 25)),
]

VOCAB = ("heart size normal enlarged lungs lung clear no focal consolidation pleural effusion pneumothorax "
         "the a an of is are there mild moderate severe left right upper lower lobe opacity opacities "
         "atelectasis cardiomegaly stable unchanged compared prior study tube line tip catheter "
         "mediastinal contours within limits degenerative changes spine thoracic bibasilar edema "
         "pulmonary vascular congestion nodule mass cm mm 3.5 1,200 2 one two don't isn't it's patient's "
         "left-sided well-defined x-ray ap/pa s/p status post effusions consolidations studies").split()
PUNCTS = [".", ",", ";", ":", "!", "?", " (", ")", " -", "...", '"', "'"]


def _generated(n, seed=0):
    rng = random.Random(seed)

    def text():
        out = []
        for _ in range(rng.randint(1, 40)):
            out.append(rng.choice(VOCAB))
            if rng.random() < 0.15:
                out[-1] += rng.choice(PUNCTS)
        s = " ".join(out)
        return s.capitalize() if rng.random() < 0.5 else s

    pairs = []
    for _ in range(n):
        ref = text()
        words = ref.split()
        pred = " ".join(w for w in words if rng.random() < 0.7) + " " + text() if rng.random() < 0.6 else text()
        pairs.append((ref, pred.strip()))
    return pairs


PAIRS = HAND + _generated(100)
REFS = [[r] for r, _ in PAIRS]
PREDS = [p for _, p in PAIRS]


def test_corpus_size():
    assert len(PAIRS) >= 100


# --- normalisation, F1, accuracies (official code; hand-checked) ---------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Heart.", "heart"),
    ("Yes, there is!", "yes there is"),  # ", " touches a space -> deleted; "!" replaced by space
    ("left-sided", "left sided"),  # no space next to "-" -> replaced by a space
    ("1,000 left-sided", "1000 leftsided"),  # a digit-comma-digit anywhere deletes every mark
    ("3.5 cm. two nodules", "3.5 cm 2 nodules"),
    ("dont isnt youre", "don't isn't you're"),
    ("none of the three", "0 of 3"),
    ("an apple a day", "apple day"),
    ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods removed (re.UNICODE passed as count)
])
def test_normalize_word(text, expected):
    assert M.normalize_word(text) == expected


def test_token_f1_official_quirk():
    # the official tp adds the prediction's count of a shared word: "left left" vs "left" is perfect
    assert M.token_f1([["left"]], ["left left"])["f1"] == pytest.approx(1.0)
    p, r, f = 2 / 3, 2 / 2, 2 * (2 / 3) / (2 / 3 + 1)
    assert M.token_f1([["left lung"]], ["left lung base"]) == pytest.approx({"precision": p, "recall": r, "f1": f})
    assert M.token_f1([["x"]], [""])["f1"] == 0.0 and M.token_f1([["x"]], ["y"])["f1"] == 0.0


def test_accuracies():
    refs, preds = [["no"], ["yes"], ["liver"], ["The liver"]], ["normal", "yes.", "liver, spleen", "liver"]
    assert M.closed_accuracy(refs, preds) == pytest.approx(1.0)  # "no" is a substring of "normal"
    assert M.exact_match(refs, preds) == pytest.approx(0.5)


# --- BLEU --------------------------------------------------------------------------------------

def test_sentence_bleu_matches_nltk():
    import warnings
    from nltk.translate.bleu_score import sentence_bleu
    weights = {"bleu1": (1, 0, 0, 0), "bleu2": (1 / 2, 1 / 2), "bleu3": (1 / 3, 1 / 3, 1 / 3), "bleu4": (1 / 4,) * 4}
    expected = {k: 0.0 for k in weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram counts
        for (ref, pred) in PAIRS:
            r, p = M.normalize_word(ref).split(), M.normalize_word(pred).split()
            ours = M.sentence_bleu([[ref]], [pred])
            for k, w in weights.items():
                want = sentence_bleu([r], p, weights=w)
                assert ours[k] == pytest.approx(want, abs=TOL), (k, ref, pred)
                expected[k] += want / len(PAIRS)
    assert M.sentence_bleu(REFS, PREDS) == pytest.approx(expected, abs=TOL)


@pytest.fixture(scope="module")
def java_ptb():
    """pycocoevalcap's PTBTokenizer (Java) run once on every text of the corpus."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed (pycocoevalcap's PTBTokenizer needs it)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = [t for pair in PAIRS for t in pair]
    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return {t: out[i][0] for i, t in enumerate(texts)}


def test_corpus_bleu_matches_pycocoevalcap(java_ptb):
    from pycocoevalcap.bleu.bleu import Bleu
    gts = {i: [java_ptb[r]] for i, (r, _) in enumerate(PAIRS)}
    res = {i: [java_ptb[p]] for i, (_, p) in enumerate(PAIRS)}
    for subset in (range(len(PAIRS)), range(0, len(PAIRS), 7), [0], [2]):
        want, _ = Bleu(4).compute_score({i: gts[i] for i in subset}, {i: res[i] for i in subset}, verbose=0)
        ours = M.corpus_bleu([REFS[i] for i in subset], [PREDS[i] for i in subset])
        assert [ours[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(want, abs=TOL)
    # several references per sample: closest reference length and max clipped counts
    refs = [[PAIRS[i][0], PAIRS[i + 1][0]] for i in range(0, 40, 2)]
    preds = [PAIRS[i][1] for i in range(0, 40, 2)]
    want, _ = Bleu(4).compute_score({i: [java_ptb[r] for r in rs] for i, rs in enumerate(refs)},
                                    {i: [java_ptb[p]] for i, p in enumerate(preds)}, verbose=0)
    ours = M.corpus_bleu(refs, preds)
    assert [ours[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(want, abs=TOL)


# --- ROUGE -------------------------------------------------------------------------------------

def test_rouge_matches_rouge_1_0_1():
    from rouge import Rouge
    scores = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, pred in PAIRS:
        r, p = M.normalize_word(ref), M.normalize_word(pred)
        if not r or not p:
            continue  # the official loop skips these (the library raises)
        want = Rouge().get_scores(p, r)[0]
        ours = M.rouge([[ref]], [pred])
        for k, lib in (("rouge1", "rouge-1"), ("rouge2", "rouge-2"), ("rougeL", "rouge-l")):
            assert ours[k] == pytest.approx(want[lib]["f"], abs=TOL), (k, ref, pred)
            scores[k].append(want[lib]["f"])
    assert M.rouge(REFS, PREDS) == pytest.approx({k: sum(v) / len(v) for k, v in scores.items()}, abs=TOL)
    with pytest.raises(ValueError):  # like the library, an empty hypothesis is an error at pair level
        M._rouge_pltrdy("heart", "")


# --- report generation: ROUGE and F1 on text normalised twice (eval_caption.py's call order) -------

# 33 periods: one pass strips 32 of them and leaves "none.", the second strips its period and maps it to 0
MANY_PERIODS = ("None.", "x. " * 32 + "none.")


def test_caption_rouge_and_f1_see_text_normalised_twice():
    from rouge import Rouge
    pairs = [MANY_PERIODS, ("Heart size is normal.", "the heart is normal."),
             (" ".join(f"finding {i}." for i in range(40)), " ".join(f"finding {i}." for i in range(0, 40, 2))),
             ("no pleural effusion", "")] + PAIRS[:30]
    records = [{"reference": r, "prediction": p} for r, p in pairs]
    got = M.score_dataset("caption", records)
    kept = [(r, p) for r, p in pairs if r and p]  # eval_caption.py drops empty pairs first
    twice = [(M.normalize_word(M.normalize_word(r)), M.normalize_word(M.normalize_word(p))) for r, p in kept]
    # calculate_rouge: the `rouge` library on the twice-normalised texts, skipping empty ones, averaged
    lib = [Rouge().get_scores(p, r)[0] for r, p in twice if r and p]
    for k, name in (("rouge1", "rouge-1"), ("rouge2", "rouge-2"), ("rougeL", "rouge-l")):
        assert got[k] == pytest.approx(100 * sum(s[name]["f"] for s in lib) / len(lib), abs=1e-6), k
    # BLEU sees the raw texts and METEOR the once-normalised ones (they run before the rewrite)
    refs, preds = [[r] for r, _ in kept], [p for _, p in kept]
    assert got["bleu4"] == pytest.approx(100 * M.corpus_bleu(refs, preds)["bleu4"], abs=1e-9)
    assert got["meteor"] == pytest.approx(100 * M.meteor(refs, preds), abs=1e-9)
    assert got["scored"] == len(kept)
    # the quirk matters: on text normalised once, ROUGE and F1 come out otherwise
    assert got["rouge1"] != pytest.approx(100 * M.rouge(refs, preds)["rouge1"], abs=1e-3)
    assert got["f1"] != pytest.approx(100 * M.token_f1(refs, preds)["f1"], abs=1e-3)


def test_caption_scores_of_one_pair_by_the_two_pass_rule():
    """By hand: normalised twice, "x. " * 32 + "none." is 32 x and one 0, and "None." is 0. F1 (the
    official calculate_f1score): tp 1, fp 32, fn 0, so P 1/33, R 1, F1 2/34. ROUGE-1 (rouge 1.0.1
    counts distinct unigrams): {x, 0} against {0}, P 1/2, R 1, F 2PR / (P + R + 1e-8).
    Normalised once, the prediction ends in "none.", not 0, and both would be 0."""
    ref, pred = MANY_PERIODS
    assert M.normalize_word(pred).split()[-1] == "none." and M.normalize_word(M.normalize_word(pred)).split()[-1] == "0"
    record = {"reference": ref, "prediction": pred}
    got = M.score_dataset("caption", [record])
    assert got["f1"] == pytest.approx(100 * 2 / 34, abs=1e-9)
    assert got["rouge1"] == pytest.approx(100 * 2 * 0.5 / (1.5 + 1e-8), abs=1e-9)
    assert got["rouge2"] == 0.0  # the reference has no bigram
    per_sample = M.score_sample("caption", record)
    assert per_sample["f1"] == pytest.approx(2 / 34) and per_sample["rouge1"] == pytest.approx(got["rouge1"] / 100)
    assert M.token_f1([[ref]], [pred])["f1"] == 0.0 and M.rouge([[ref]], [pred])["rouge1"] == 0.0


# --- METEOR: tests/test_meteor.py (against the Java METEOR 1.5 jar) ----------------------------


# --- boxes -------------------------------------------------------------------------------------

def test_iou_hand_checked():
    assert M.iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0  # identical
    assert M.iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0  # disjoint
    assert M.iou((0, 0, 9, 9), (2, 2, 6, 6)) == pytest.approx(25 / 100)  # nested: 5x5 pixels in 10x10
    assert M.iou((0, 0, 9, 9), (9, 0, 18, 9)) == pytest.approx(10 / 190)  # touching: share one pixel column
    assert M.iou((0, 0, 10, 10), (10, 0, 20, 10), pixel_inclusive=False) == 0.0  # continuous: touching = 0
    assert M.iou((0, 0, 10, 10), (5, 0, 15, 10), pixel_inclusive=False) == pytest.approx(50 / 150)
    assert M.iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0  # zero-area box is one pixel in the official convention
    assert M.iou((5, 5, 5, 5), (5, 5, 5, 5), pixel_inclusive=False) == 0.0  # ... and empty in continuous
    assert M.iou((5, 5, 2, 9), (0, 0, 9, 9)) == 0.0  # reversed by 3 pixels: no overlap, and the area
    # (2 - 5 + 1) * (9 - 5 + 1) = -10 only shrinks the union to 90, so the IoU is 0 / 90


def test_iou_of_a_box_reversed_by_less_than_a_pixel():
    """eval_utils.computeIoU has no reversed-box check; its arithmetic, worked out by hand:
    pred (5, 0, 4.5, 10) vs gt (0, 0, 10, 10): intersection (4.5 - 5 + 1) * (10 - 0 + 1) = 0.5 * 11,
    pred area (4.5 - 5 + 1) * (10 - 0 + 1) = 5.5, gt area 11 * 11 = 121, union 121 + 5.5 - 5.5 = 121."""
    assert M.iou((5, 0, 4.5, 10), (0, 0, 10, 10)) == pytest.approx(5.5 / 121, abs=1e-12)
    # the same box as a REC answer: grid {<10><0><9><20>} on a 50x50 image is x 5 -> 4.5, y 0 -> 10 pixels
    assert M.rec_iou((10, 0, 9, 20), [0, 0, 10, 10], (50, 50)) == pytest.approx(5.5 / 121, abs=1e-12)
    # reversed by half a pixel both ways: (0.5 * 0.5) / (121 + 0.25 - 0.25); the area stays positive
    assert M.iou((5, 5, 4.5, 4.5), (0, 0, 10, 10)) == pytest.approx(0.25 / 121, abs=1e-12)
    records = [{"pred_box": (10, 0, 9, 20), "box": [0, 0, 10, 10], "image_size": [50, 50]},
               {"pred_box": None, "box": [0, 0, 10, 10], "image_size": [50, 50]}]
    assert M.score_dataset("refer", records)["iou"] == pytest.approx(100 * (5.5 / 121) / 2, abs=1e-9)


def test_rec_iou_and_recall():
    # grid box {<10><20><60><70>} on a 200x100 image -> pixels (20, 20, 120, 70); gt [20, 20, 100, 50]
    assert M.rec_iou((10, 20, 60, 70), [20, 20, 100, 50], (200, 100)) == 1.0
    assert M.rec_iou(None, [20, 20, 100, 50], (200, 100)) == 0.0  # unparsable prediction
    assert M.recall_at([0.5, 0.51, 0.2, 1.0]) == 0.5  # strict ">"
    assert M.recall_at([0.5, 0.51, 0.2, 1.0], threshold=0.3) == 0.75


# --- command line ------------------------------------------------------------------------------

def test_score_command_scores_a_predictions_file(tmp_path):
    rows = [{"task": "vqa", "prediction": "Yes", "reference": "yes", "answer_type": "CLOSED"},
            {"task": "vqa", "prediction": "the liver", "reference": "liver", "answer_type": "OPEN"},
            {"task": "cls", "prediction": "melanoma", "reference": "Melanoma"},
            {"task": "caption", "prediction": "the heart is normal.", "reference": "Heart size is normal."}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run([sys.executable, "-m", "workshop.score", str(path)], capture_output=True, text=True,
                         check=True, cwd=Path(M.__file__).parent).stdout
    assert "vqa (2 samples)" in out and "closed_acc 100.00" in out and "f1 100.00" in out
    assert "cls (1 samples): acc 100.00" in out and "caption (1 samples)" in out and "rougeL" in out
