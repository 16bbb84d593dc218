"""lib/meteor.py against the Java METEOR 1.5 jar that pycocoevalcap runs (`-l en -norm`), started once.

Corpora: the 133 non-empty test pairs of tests/test_metrics.py, and 500 report pairs generated here
with varied wording (synonyms, paraphrases, inflections, reordered sentences and phrases, repeated
and dropped words, punctuation, abbreviations). Each is scored as eval_caption.py feeds the jar
(normalize_word, then PTB tokens) and, to exercise METEOR's own `-norm` tokeniser, as raw text with
one or two references. Needs Java and pycocoevalcap's METEOR data; skipped with a message otherwise.
"""
import os
import random
import shutil
import subprocess
import threading

import pytest

from lib import meteor
import metrics as M
from test_metrics import PAIRS

TOL = 1e-4  # the bar; in practice every statistic is equal, so scores agree to ~1e-16

SENTENCES = [
    "the heart size is normal", "the cardiac silhouette is enlarged", "there is no pleural effusion or pneumothorax",
    "the lungs are clear", "no focal consolidation is seen", "mild cardiomegaly is unchanged compared to the prior study",
    "there is a small left pleural effusion", "the mediastinal contours are within normal limits",
    "degenerative changes of the thoracic spine are noted", "a right internal jugular catheter terminates in the svc",
    "there is increased opacity at the left lung base which may represent atelectasis or pneumonia",
    "pulmonary vascular congestion has improved since the previous exam", "the endotracheal tube tip is 4 cm above the carina",
    "no acute cardiopulmonary process", "bilateral hilar lymphadenopathy is again demonstrated",
    "the patient has a history of congestive heart failure", "there are multiple healed rib fractures on the right",
    "a 3.5 cm mass is seen in the right upper lobe", "moderate pulmonary edema has worsened",
    "the nasogastric tube extends below the diaphragm", "surgical clips are present in the upper abdomen",
    "the ct scan shows a large hypodense lesion in the liver", "mri of the brain demonstrates no acute infarct",
    "there is mild narrowing of the disc space at l4-l5", "the kidneys are normal in size and shape",
]
VARIANTS = {  # WordNet synonyms, table paraphrases, inflections, near misses
    "normal": ["within normal limits", "unremarkable", "regular", "usual", "normally"],
    "enlarged": ["increased in size", "large", "big", "enlarging", "expanded", "enlargement"],
    "no": ["without", "not any", "absence of", "there is no"], "clear": ["clean", "free", "unclouded", "clearly"],
    "seen": ["visible", "noted", "observed", "visualized", "seeing", "identified"],
    "unchanged": ["stable", "the same", "not changed", "unaltered", "unchanging"],
    "compared to": ["compared with", "relative to", "in comparison with", "versus"],
    "small": ["little", "minor", "tiny", "smaller", "slight"], "large": ["big", "huge", "sizable", "larger", "great"],
    "shows": ["demonstrates", "reveals", "displays", "showed", "show", "showing"],
    "demonstrates": ["shows", "demonstrated", "exhibits"], "mild": ["slight", "minimal", "mildly", "modest"],
    "increased": ["higher", "greater", "elevated", "increasing", "increase"],
    "improved": ["better", "improving", "ameliorated"], "worsened": ["deteriorated", "gotten worse", "worse", "worsening"],
    "opacity": ["opacities", "opacification", "density"], "effusion": ["effusions", "fluid"],
    "history": ["past", "background", "histories"], "patient": ["patients", "subject"],
    "lesion": ["lesions", "abnormality", "injury"], "fractures": ["fracture", "breaks", "fractured"],
    "multiple": ["several", "many", "numerous"], "present": ["seen", "there", "presence"], "prior": ["previous", "earlier"],
    "previous": ["prior", "preceding", "former"], "represent": ["represents", "be", "reflect", "indicate"],
    "may": ["might", "could", "can"], "is": ["are", "was", "appears", "seems"], "are": ["is", "were"],
    "there is": ["there are", "we see", "one sees"], "above": ["over", "superior to"], "below": ["under", "beneath"],
    "again": ["once again", "still", "once more"], "acute": ["sharp", "severe", "critical"],
    "size": ["sizes", "dimension"], "liver": ["hepatic"], "kidneys": ["kidney", "renal"],
    "brain": ["cerebral", "encephalon"], "heart": ["cardiac"],
}
PUNCT = [",", ".", ";", ":", "!", "?", " ...", " --", " -", " (", ")", '"', "'s", " \u201c", "\u201d", "\u2019"]
EXTRAS = ["dr. smith", "e.g.", "i.e.", "u.s.", "vs.", "no. 5", "1,200 ml", "3.5x2.1 cm", "left-sided", "x-ray",
          "don't", "isn't", "it's", "patient's", "1990's", "s/p", "+/-", "approx.", "~5 mm", "t2-weighted"]


def _rewrite(rng, text):
    words, out, k = text.split(), [], 0
    while k < len(words):
        two = " ".join(words[k:k + 2])
        if two in VARIANTS and rng.random() < 0.6:
            out.append(rng.choice(VARIANTS[two]))
            k += 2
            continue
        w = words[k].rstrip(".")
        if w in VARIANTS and rng.random() < 0.5:
            out.append(rng.choice(VARIANTS[w]) + ("." if words[k].endswith(".") else ""))
        elif rng.random() < 0.06:
            out.append(words[k] + " " + words[k])  # repeated word
        elif rng.random() >= 0.06:  # else the word is dropped
            out.append(words[k])
        if rng.random() < 0.08:
            out.append(rng.choice(PUNCT))
        if rng.random() < 0.03:
            out.append(rng.choice(EXTRAS))
        k += 1
    sentences = " ".join(out).split(". ")
    if rng.random() < 0.4:
        rng.shuffle(sentences)  # reordered sentences
    text = ". ".join(sentences)
    if rng.random() < 0.2:  # the two halves swapped: reordered phrases
        cut = text.split(" ")
        m = rng.randint(1, max(1, len(cut) - 1))
        text = " ".join(cut[m:] + cut[:m])
    return text.capitalize() if rng.random() < 0.5 else text


def varied_pairs(n, seed=0):
    """n (reference, prediction) report pairs; a prediction rewrites its reference, or is another report."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        ref = ". ".join(rng.sample(SENTENCES, rng.randint(1, 4))) + "."
        pred = _rewrite(rng, ref) if rng.random() < 0.85 else ". ".join(rng.sample(SENTENCES, 2)) + "."
        pairs.append((_rewrite(rng, ref) if rng.random() < 0.15 else ref, pred))
    return pairs


OFFICIAL = [(r, p) for r, p in PAIRS if r.strip() and p.strip()]  # eval_caption.py drops empty ones
VARIED = varied_pairs(500)


def _pipeline(text):
    return M.ptb_tokenize(M.normalize_word(text))


@pytest.fixture(scope="module")
def data():
    data = meteor.meteor_data()
    if data.folder is None:
        pytest.skip("pycocoevalcap's METEOR data (meteor-1.5.jar, data/paraphrase-en.gz) not found")
    return data


class Jar:
    """The jar in stdio mode, as pycocoevalcap's Meteor drives it; `extra` adds command-line options."""

    def __init__(self, folder, *extra):
        if shutil.which("java") is None:
            pytest.skip("java is not installed (the METEOR 1.5 jar needs it)")
        self.proc = subprocess.Popen(["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en",
                                      "-norm", *extra], cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.lock = threading.Lock()

    def ask(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def score(self, references, predictions):
        """(statistics of each sample, score of each sample, corpus score): SCORE lines, then EVAL."""
        preds = [p.replace("|||", "").replace("  ", " ") for p in predictions]  # as pycocoevalcap sends them
        stats = [self.ask(" ||| ".join(["SCORE", *refs, p])) for refs, p in zip(references, preds)]
        first = self.ask("EVAL ||| " + " ||| ".join(stats))
        scores = [float(first)] + [float(self.proc.stdout.readline()) for _ in stats]
        return [[int(float(x)) for x in s.split()] for s in stats], scores[:-1], scores[-1]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


@pytest.fixture(scope="module")
def jar(data):
    jar = Jar(data.folder)
    yield jar
    jar.close()


def _check_parity(jar, data, references, predictions, expect_modules=()):
    want_stats, want_scores, want_corpus = jar.score(references, predictions)
    preds = [p.replace("|||", "").replace("  ", " ") for p in predictions]
    stats = [meteor.segment_stats(refs, p, data) for refs, p in zip(references, preds)]
    scores = [meteor.score(s) for s in stats]
    off = [(i, want_stats[i], stats[i]) for i in range(len(stats)) if abs(scores[i] - want_scores[i]) > TOL]
    assert len(off) <= 0.01 * len(stats), "\n".join(f"{references[i]} | {predictions[i]}\n  jar  {w}\n  ours {o}"
                                                    for i, w, o in off[:5])
    assert meteor.corpus_score(stats) == pytest.approx(want_corpus, abs=TOL)
    for module in expect_modules:  # the corpus exercises each module (else the test proves little)
        assert sum(s[4 + 4 * module] > 0 for s in want_stats) >= 0.05 * len(stats), meteor.MODULES[module]
    return want_corpus


def test_official_pairs_match_the_jar(jar, data):
    refs, preds = [[_pipeline(r)] for r, _ in OFFICIAL], [_pipeline(p) for _, p in OFFICIAL]
    assert len(OFFICIAL) == 133
    want = _check_parity(jar, data, refs, preds)
    # metrics.meteor is the same pipeline, from the raw texts
    assert M.meteor([[r] for r, _ in OFFICIAL], [p for _, p in OFFICIAL], data) == pytest.approx(want, abs=TOL)


def test_varied_pairs_match_the_jar(jar, data):
    refs, preds = [[_pipeline(r)] for r, _ in VARIED], [_pipeline(p) for _, p in VARIED]
    _check_parity(jar, data, refs, preds, expect_modules=(0, 1, 2, 3))


def test_raw_texts_and_two_references_match_the_jar(jar, data):
    # METEOR's own tokeniser on raw text (dots, abbreviations, quotes, dashes, contractions), and
    # the best of several references
    texts = [t for pair in VARIED[:250] + OFFICIAL for t in pair]
    refs = [[texts[k]] if k % 3 else [texts[k], texts[(7 * k + 1) % len(texts)]] for k in range(0, len(texts), 2)]
    _check_parity(jar, data, refs, [texts[k + 1] for k in range(0, len(texts), 2)], expect_modules=(0, 1, 2, 3))


def test_words_of_one_hash_match_as_in_the_jar(jar, data):
    """The jar compares words by String.hashCode: "e1" and "co" (3180), "t2" and "rp" are one word."""
    refs, preds = [["ky e1"], ["t2 scan"]], ["x co ed", "rp scan"]
    want, _, _ = jar.score(refs, preds)
    assert [meteor.segment_stats(r, p, data) for r, p in zip(refs, preds)] == want
    assert want[0][4] == 1 and want[1][4] == 2  # exact matches


def test_fallback_matches_the_jar_with_exact_and_stem_only(data, tmp_path):
    # without data files: the jar restricted to its exact and stem modules, with no function words
    (tmp_path / "none.words").write_text("")
    jar = Jar(data.folder, "-m", "exact stem", "-s", str(tmp_path / "none.words"))
    try:
        refs, preds = [[_pipeline(r)] for r, _ in VARIED[:200]], [_pipeline(p) for _, p in VARIED[:200]]
        _check_parity(jar, meteor.MeteorData(None), refs, preds, expect_modules=(0, 1))
    finally:
        jar.close()
    assert "not comparable" in meteor.MeteorData(None).description


def test_stemmer_matches_the_jar(data):
    """Snowball English against the jar's own Stemmer tool, on every word of its WordNet list."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    synsets, bases = data.synsets
    # the tool leaves "numbers" (only digits , . -) alone; every word of the list is ASCII
    words = sorted(w for w in set(synsets) | set(bases) if not set(w) <= set("0123456789,.-"))
    out = subprocess.run(["java", "-cp", os.path.join(data.folder, meteor.METEOR_JAR), "Stemmer", "en"],
                         input="\n".join(words), capture_output=True, text=True, check=True).stdout.split("\n")
    stemmer = meteor.SnowballEnglish()
    assert len(words) > 90000
    wrong = [(w, j, stemmer.stem(w)) for w, j in zip(words, out) if stemmer.stem(w) != j]
    assert not wrong, wrong[:20]


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meteor-1.5.jar"):
        meteor.find_data(str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / meteor.METEOR_JAR).write_text("not a zip")
    (tmp_path / meteor.METEOR_PARAPHRASES).write_bytes(b"\x1f\x8b truncated")
    data = meteor.meteor_data(str(tmp_path))
    with pytest.raises(ValueError, match="meteor-1.5.jar: cannot read"):
        data.function_words
    with pytest.raises(ValueError, match="paraphrase-en.gz: cannot be read"):
        data.paraphrases
