"""METEOR 1.5 written by hand: the scorer behind the paper's report-generation METEOR, without Java.

The paper's METEOR (Table 3) comes from pycocoevalcap's Meteor, which starts the Java jar as
`java -jar meteor-1.5.jar - - -stdio -l en -norm`, sends one `SCORE ||| reference ||| hypothesis`
line per sample (the jar answers with the sample's 23 statistics) and then one `EVAL ||| stats |||
stats ...` line, and reports the last number of the answer: the score of the statistics summed over
the corpus, not a mean of sample scores. This file computes the same numbers from the same data
files: the jar itself (a zip: function words, non-breaking prefixes, WordNet synonyms) and
data/paraphrase-en.gz, both shipped with pycocoevalcap. metrics.meteor feeds it as the official
eval_caption.py does; tests/test_meteor.py checks it against the jar, statistic by statistic.

Where each fact comes from (the METEOR 1.5 README, "Meteor Universal" by Denkowski & Lavie, WMT
2014, section 2, and the source at github.com/cmu-mtlab/meteor, checked against the jar's classes
with javap and against its outputs):
  parameters    alpha 0.85, beta 0.20, gamma 0.60, delta 0.75; module weights exact 1.0, stem 0.6,
                synonym 0.8, paraphrase 0.6: English, task "rank", the default of a supported
                language (Constants.java PARAM_RANK / WEIGHT_RANK; the README's and the jar's Eval ID
                meteor-1.5-wo-en-norm-0.85_0.2_0.6_0.75-ex_st_sy_pa-1.0_0.6_0.8_0.6); beam 40 (README).
  normalisation `-norm`: Normalizer.normalizeLine (Moses-style tokenisation with METEOR's additions:
                quotes and dashes unified, word-word split, U.S. -> US), then lower-casing.
  matching      four modules in order (Aligner.align): exact words; stems from Snowball's English
                stemmer (Porter2, the jar's org.tartarus.snowball.ext.englishStemmer); synonyms: a
                shared WordNet synset of the words or of their base forms (synonym/english.synsets,
                english.exceptions, WordNet 3's suffix rules); paraphrases: phrase pairs of
                paraphrase-en.gz found in both lines, in either direction.
  alignment     matches that nothing else competes for are fixed; a beam search (width 40) over the
                reference places the rest, ranking partial alignments by matched words (counted with
                weights 1, 0.5, 0.5, 0.5 and summed in an int), then fewer chunks, then less distance.
  scoring       P and R count matched words weighted by module, content words by delta and function
                words (function/english.words) by 1 - delta; Fmean = P R / (alpha P + (1 - alpha) R);
                frag = chunks / mean matched words (0 when every word matches in one chunk);
                score = Fmean (1 - gamma frag^beta) (Denkowski & Lavie 2014, section 2).
  corpus        the EVAL line sums the statistics of every sample, leaving out the single chunk of
                a perfectly matched sample, and scores the sum once (MeteorStats.addStats).
The jar's quirks kept because they change scores: the search's int sums (a one-word stem or
synonym match adds nothing to the rank), the distance it adds to the wrong path, its match order
(ties in the beam go to the first path), and the best reference chosen by segment score.

It compares words by their String.hashCode, so two words of one hash ("e1" and "co") match
exactly: so do we. On the test corpora every statistic of every sample equals the jar's.

Without the data files only what needs no data runs: exact and stem modules, no function words, no
non-breaking prefixes. That fallback is labelled as such and is not comparable with the paper.
"""
import functools
import gzip
import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass

# -------------------------------------------------------------------------------------------------
# 1. Parameters and data files

@dataclass
class MeteorConfig:
    """METEOR 1.5's English defaults (task "rank"; the jar's Eval ID says 0.85_0.2_0.6_0.75 and
    1.0_0.6_0.8_0.6). Constants.java: PARAM_RANK / WEIGHT_RANK[english], DEFAULT_BEAM_SIZE."""
    alpha: float = 0.85  # Fmean = 1 / ((1 - alpha) / P + alpha / R)
    beta: float = 0.20  # penalty = gamma * frag ** beta
    gamma: float = 0.60
    delta: float = 0.75  # weight of content words; function words get 1 - delta
    weights: tuple = (1.0, 0.6, 0.8, 0.6)  # a match's credit by module: exact, stem, synonym, paraphrase
    beam: int = 40  # alignment beam width


METEOR_JAR, METEOR_PARAPHRASES = "meteor-1.5.jar", os.path.join("data", "paraphrase-en.gz")
MODULES = ("exact", "stem", "synonym", "paraphrase")
# the alignment search ranks matches with these weights, not the scoring ones (MeteorScorer.java),
# and keeps their sum in an int, so a one-word stem/synonym match adds int(x + 0.5) = x, i.e. nothing
SEARCH_WEIGHTS = (1.0, 0.5, 0.5, 0.5)
# WordNet 3 morphology (SynonymDictionary.morph): (suffix, ending) rules for nouns, verbs, adjectives
MORPHY = [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y"), ("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", ""), ("er", ""), ("est", ""), ("er", "e"), ("est", "e")]


def find_data(path=None):
    """The folder holding meteor-1.5.jar and data/paraphrase-en.gz (pycocoevalcap/meteor/ or the
    METEOR 1.5 release): `path`, else $METEOR_DATA, else the installed pycocoevalcap's copy (found,
    not imported); None when there is none. A folder named by the caller must hold both files."""
    path = path or os.environ.get("METEOR_DATA")
    if path:
        missing = [f for f in (METEOR_JAR, METEOR_PARAPHRASES) if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"METEOR data {path}: no {' or '.join(missing)} in it (expected the folder "
                                    f"of pycocoevalcap/meteor/ or of the METEOR 1.5 release)")
        return os.path.abspath(path)
    spec = importlib.util.find_spec("pycocoevalcap")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, "meteor")
        if all(os.path.isfile(os.path.join(folder, f)) for f in (METEOR_JAR, METEOR_PARAPHRASES)):
            return folder
    return None


class MeteorData:
    """METEOR 1.5's English resources, read on first use from its jar (a zip) and paraphrase table.

    Without a folder, only the modules that need no data run (exact, stem), with no function words
    and no non-breaking prefixes: the fallback, whose numbers are not comparable with the paper's.
    """

    def __init__(self, folder):
        self.folder = folder
        self.modules = MODULES if folder else MODULES[:2]
        self.description = (f"METEOR 1.5 ({', '.join(self.modules)}; data from {folder})" if folder else
                            "METEOR 1.5 with its exact and stem modules only (no METEOR data found: "
                            "not comparable with the paper's METEOR)")
        self.stemmer = SnowballEnglish()
        self._synonyms, self._paraphrases_split = {}, {}  # caches

    def _jar_lines(self, name):
        if not self.folder:
            return []
        path = os.path.join(self.folder, METEOR_JAR)
        try:
            with zipfile.ZipFile(path) as jar:
                return jar.read(name).decode("utf-8").split("\n")
        except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read {name} from it (not METEOR 1.5's jar, or damaged?): {e}") from None

    @functools.cached_property
    def function_words(self):
        return set(self._jar_lines("function/english.words"))

    @functools.cached_property
    def prefixes(self):
        """Non-breaking prefixes: {prefix: "any", or "number" when it keeps its period before a number only}."""
        out = {}
        for line in self._jar_lines("nonbreaking/english.prefixes"):
            tok = line.split()
            if tok and not tok[0].startswith("#"):
                out[tok[0]] = "number" if tok[1:2] == ["#NUMERIC_ONLY#"] else "any"
        return out

    @functools.cached_property
    def synsets(self):
        """word -> WordNet synset ids, and inflected form -> base forms (the exceptions list)."""
        lines = self._jar_lines("synonym/english.synsets")
        synsets = {w: frozenset(map(int, ids.split())) for w, ids in zip(lines[0::2], lines[1::2])}
        lines = self._jar_lines("synonym/english.exceptions")
        bases = {}
        for base, forms in zip(lines[0::2], lines[1::2]):
            for form in forms.split():
                bases.setdefault(form, []).append(base)
        return synsets, bases

    def synonyms(self, word):
        """Synset ids of a word and of its base forms (SynonymDictionary getSynSets + getStemSynSets)."""
        if word not in self._synonyms:
            synsets, bases = self.synsets
            if word in bases:
                base_forms = bases[word]
            elif word.endswith("ss") or len(word) <= 2:
                base_forms = [word]
            else:  # the first WordNet rule that gives a known word
                base_forms = [next((word[:-len(s)] + e for s, e in MORPHY
                                    if word.endswith(s) and word[:-len(s)] + e in synsets), "")]
            self._synonyms[word] = synsets.get(word, frozenset()).union(*(synsets.get(b, ()) for b in base_forms))
        return self._synonyms[word]

    @functools.cached_property
    def paraphrases(self):
        """phrase -> its paraphrases, "\\n"-joined in file order (one string per phrase keeps the
        5.3 million entries in a few hundred MB); read once, on first use."""
        table, path = {}, os.path.join(self.folder, METEOR_PARAPHRASES)
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                # three lines an entry: a probability (METEOR ignores it), the phrase, its paraphrase;
                # the file lists a phrase's paraphrases together, so each phrase is joined once
                phrase, group = None, []
                for _, ref, par in zip(f, f, f):
                    if ref != phrase:
                        self._add_paraphrases(table, phrase, group)
                        phrase, group = ref, []
                    group.append(par.rstrip("\n"))
                self._add_paraphrases(table, phrase, group)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot be read as METEOR's paraphrase table (truncated or damaged?): {e}") from None
        if not table:
            raise ValueError(f"{path}: no paraphrases in it (expected METEOR 1.5's paraphrase-en.gz)")
        self.longest_phrase = max(p.count(" ") for p in table) + 1
        return table

    @staticmethod
    def _add_paraphrases(table, phrase, group):
        if group:
            key, value = phrase.rstrip("\n"), "\n".join(group)
            table[key] = table[key] + "\n" + value if key in table else value

    def paraphrases_at(self, words, start):
        """(length, paraphrase words) of every table phrase that starts at words[start], shortest first."""
        out, table = [], self.paraphrases
        for n in range(1, min(self.longest_phrase, len(words) - start) + 1):
            phrase = " ".join(words[start:start + n])
            if phrase in table and phrase not in self._paraphrases_split:
                self._paraphrases_split[phrase] = [tuple(p.split(" ")) for p in table[phrase].split("\n")]
            out += [(n, p) for p in self._paraphrases_split.get(phrase, ())]
        return out


@functools.lru_cache(maxsize=None)
def _meteor_data(folder):
    return MeteorData(folder)


def meteor_data(path=None):
    """The MeteorData of `path` (see find_data), one per folder and process."""
    return _meteor_data(find_data(path))


# -------------------------------------------------------------------------------------------------
# 2. Normalisation (`-norm`): Normalizer.normalizeLine(english, keepPunctuation=true), lower-cased

_ALPHA = ("A-Za-z\u0160\u017d\u0161\u017e\u0178\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u017e"
          "\u0400-\u04ff\u0500-\u0527\ua640-\ua66e\ua67e-\ua697\u1d00-\u1d7f")
_ALNUM = "0-9" + _ALPHA
_JAVA_SPACE = " \t\n\x0b\f\r"  # Java's \s; \p{Digit} and \p{Lower} are ASCII too
METEOR_NORM_1 = [  # (pattern, replacement) before the dots are split off words, in the jar's order
    (re.compile(f"([^{_ALNUM}{_JAVA_SPACE}.'`,\\-\u2018\u2019])"), r" \1 "),  # isolate other symbols
    (re.compile(r"\.(\.+)"), r" DOTMULTI\1")]  # escape "..." (the loop below finishes it)
METEOR_NORM_2 = [
    (re.compile(r"([^0-9]),([^0-9])"), r"\1 , \2"),  # commas, except inside numbers
    (re.compile(r"([0-9]),([^0-9])"), r"\1 , \2"),
    (re.compile(r"([^0-9]),([0-9])"), r"\1 , \2"),
    (re.compile("[`\u2018\u2019]"), "'"),  # quotes
    (re.compile("[\u201c\u201d]|''"), ' " ')]
METEOR_NORM_3 = [
    (re.compile(f"([{_ALNUM}.])-([{_ALNUM}])"), r"\1 \2"),  # word-word -> word word (partial credit)
    (re.compile(f"([^{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),  # English contractions split to the right
    (re.compile(f"([^{_ALPHA}0-9])'([{_ALPHA}])"), r"\1 ' \2"),
    (re.compile(f"([{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),
    (re.compile(f"([{_ALPHA}])'([{_ALPHA}])"), r"\1 '\2"),
    (re.compile(r"([0-9])'(s)"), r"\1 '\2")]
_HAS_ALPHA = re.compile(f"[{_ALPHA}]")
_JAVA_TOKENS = re.compile("[^ \t\n\r\f]+")  # java.util.StringTokenizer's default delimiters
_WHITE = re.compile("[ \u2000-\u200a\u202f\u205f\u3000\u00a0]+")
_JAVA_TRIM = "".join(map(chr, range(33)))  # String.trim() strips every char <= ' '


def tokenize(text, prefixes):
    """METEOR's `-norm` tokens of one text (Moses-style tokenisation, lower-cased)."""
    s = " " + text + " "
    for pattern, rep in METEOR_NORM_1:
        s = pattern.sub(rep, s)
    while "DOTMULTI." in s:
        s = re.sub(r"DOTMULTI\.([^.])", r"DOTDOTMULTI \1", s).replace("DOTMULTI.", "DOTDOTMULTI")
    for pattern, rep in METEOR_NORM_2:
        s = pattern.sub(rep, s)
    s = s.replace("\u2013", "-").replace("--", "-")
    for pattern, rep in METEOR_NORM_3:
        s = pattern.sub(rep, s)
    words, out = _JAVA_TOKENS.findall(s), []
    for i, w in enumerate(words):  # a final period leaves its word unless the word is an abbreviation
        nxt = words[i + 1][:1] if i + 1 < len(words) else ""
        kind = prefixes.get(w[:-1])
        if len(w) < 2 or not w.endswith("."):
            out.append(w)
        elif "." in w[:-1] and _HAS_ALPHA.search(w[:-1]):
            out.append(w.replace(".", ""))  # U.S. -> US
        elif kind == "any" or "a" <= nxt <= "z" or (kind == "number" and "0" <= nxt <= "9"):
            out.append(w)
        else:
            out.append(w[:-1] + " .")
    s = " ".join(out)
    while "DOTDOTMULTI" in s:
        s = s.replace("DOTDOTMULTI", "DOTMULTI.")
    s = _WHITE.sub(" ", s.replace("DOTMULTI", ".")).strip(_JAVA_TRIM).lower()
    return _JAVA_TOKENS.findall(s)


# -------------------------------------------------------------------------------------------------
# 3. The stemmer

class SnowballEnglish:
    """Snowball's English ("Porter2") stemmer, the one METEOR 1.5 stems English with
    (org.tartarus.snowball.ext.englishStemmer in the jar; snowball.tartarus.org/algorithms/english)."""

    V = "aeiouy"  # vowels; a y that acts as a consonant is marked Y first
    EXCEPTIONS = {"skis": "ski", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "idly": "idl",
                  "gently": "gentl", "ugly": "ugli", "early": "earli", "only": "onli", "singly": "singl",
                  "sky": "sky", "news": "news", "howe": "howe", "atlas": "atlas", "cosmos": "cosmos",
                  "bias": "bias", "andes": "andes"}
    INVARIANT = {"inning", "outing", "canning", "herring", "earring", "proceed", "exceed", "succeed"}
    DOUBLES = ("bb", "dd", "ff", "gg", "mm", "nn", "pp", "rr", "tt")
    STEP2 = {"tional": "tion", "enci": "ence", "anci": "ance", "abli": "able", "entli": "ent", "izer": "ize",
             "ization": "ize", "ational": "ate", "ation": "ate", "ator": "ate", "alism": "al", "aliti": "al",
             "alli": "al", "fulness": "ful", "ousli": "ous", "ousness": "ous", "iveness": "ive", "iviti": "ive",
             "biliti": "ble", "bli": "ble", "ogi": "og", "fulli": "ful", "lessli": "less", "li": ""}
    STEP3 = {"tional": "tion", "ational": "ate", "alize": "al", "icate": "ic", "iciti": "ic", "ical": "ic",
             "ful": "", "ness": "", "ative": ""}
    STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ism", "ate",
             "iti", "ous", "ive", "ize", "ion")

    def __init__(self):
        self.cache = {}

    @staticmethod
    def _longest(word, suffixes):
        # Snowball's `among` takes the longest suffix that fits, and only that one
        return max((s for s in suffixes if word.endswith(s)), key=len, default=None)

    def _after_vowel_consonant(self, w, start):
        i = next((k for k in range(start, len(w)) if w[k] in self.V), len(w))
        i = next((k for k in range(i + 1, len(w)) if w[k] not in self.V), len(w))
        return min(i + 1, len(w))

    def _short_syllable(self, w):
        return (len(w) >= 3 and w[-3] not in self.V and w[-2] in self.V and w[-1] not in self.V + "wxY") or \
            (len(w) == 2 and w[0] in self.V and w[1] not in self.V)

    def stem(self, word):
        if word not in self.cache:
            self.cache[word] = self.EXCEPTIONS.get(word) or (word if len(word) < 3 else self._stem(word))
        return self.cache[word]

    def _stem(self, w):
        V = self.V
        w = w[1:] if w.startswith("'") else w
        chars, y_found = list(w), False  # mark consonant y: at the start, or after a vowel
        for k, c in enumerate(chars):
            if c == "y" and (k == 0 or chars[k - 1] in V):
                chars[k], y_found = "Y", True
        w = "".join(chars)
        # R1 / R2: the part after the first (second) vowel-consonant pair
        p1 = next((len(p) for p in ("gener", "commun", "arsen") if w.startswith(p)), None)
        p1 = self._after_vowel_consonant(w, 0) if p1 is None else p1
        p2 = self._after_vowel_consonant(w, p1)
        # step 1a: apostrophes and plurals
        s = self._longest(w, ("'", "'s", "'s'"))
        w = w[:-len(s)] if s else w
        s = self._longest(w, ("sses", "ied", "ies", "s", "us", "ss"))
        if s == "sses":
            w = w[:-2]
        elif s in ("ied", "ies"):
            w = w[:-3] + ("i" if len(w) > 4 else "ie")
        elif s == "s" and any(c in V for c in w[:-2]):
            w = w[:-1]
        if w in self.INVARIANT:
            return w.replace("Y", "y") if y_found else w
        # step 1b: -eed, -ed, -ing
        s = self._longest(w, ("eed", "eedly", "ed", "edly", "ing", "ingly"))
        if s in ("eed", "eedly"):
            w = w[:-len(s)] + "ee" if len(w) - len(s) >= p1 else w
        elif s and any(c in V for c in w[:-len(s)]):
            w = w[:-len(s)]
            if w.endswith(("at", "bl", "iz")):
                w += "e"
            elif w.endswith(self.DOUBLES):
                w = w[:-1]
            elif len(w) == p1 and self._short_syllable(w):
                w += "e"
        # step 1c: y -> i after a consonant that is not the first letter
        if len(w) > 2 and w[-1] in "yY" and w[-2] not in V:
            w = w[:-1] + "i"
        # steps 2 and 3: suffixes in R1
        s = self._longest(w, self.STEP2)
        if s and len(w) - len(s) >= p1 and (s != "ogi" or w[-4:-3] == "l") and \
                (s != "li" or w[-3:-2] in tuple("cdeghkmnrt")):
            w = w[:-len(s)] + self.STEP2[s]
        s = self._longest(w, self.STEP3)
        if s and len(w) - len(s) >= (p2 if s == "ative" else p1):
            w = w[:-len(s)] + self.STEP3[s]
        # step 4: suffixes in R2
        s = self._longest(w, self.STEP4)
        if s and len(w) - len(s) >= p2 and (s != "ion" or w[-4:-3] in ("s", "t")):
            w = w[:-len(s)]
        # step 5: final e and ll
        if w.endswith("e") and (len(w) - 1 >= p2 or (len(w) - 1 >= p1 and not self._short_syllable(w[:-1]))):
            w = w[:-1]
        elif w.endswith("l") and len(w) - 1 >= p2 and w[-2:-1] == "l":
            w = w[:-1]
        return w.replace("Y", "y") if y_found else w


# -------------------------------------------------------------------------------------------------
# 4. Alignment: Aligner.align, its four matchers, and the beam search over their matches
# A match is (ref start, ref length, test start, test length, module); the test is line 1, the
# reference line 2, and the search walks the reference left to right.

@functools.lru_cache(maxsize=None)
def java_hash(word):
    """Java's String.hashCode: 31 h + c over the UTF-16 code units, as a 32-bit int."""
    units, h = word.encode("utf-16-be", "surrogatepass"), 0
    for k in range(0, len(units), 2):
        h = (31 * h + (units[k] << 8 | units[k + 1])) & 0xFFFFFFFF
    return h


def _candidates(test, ref, data):
    """Every match the modules find, listed by reference start in the jar's order, and how many
    candidate matches cover each test / reference word."""
    cands, cover1, cover2 = [[] for _ in ref], [0] * len(test), [0] * len(ref)

    def add(j, jn, i, i_n, module):
        cands[j].append((j, jn, i, i_n, module))
        for k in range(i, i + i_n):
            cover1[k] += 1
        for k in range(j, j + jn):
            cover2[k] += 1

    def positions(words):
        out = {}
        for i, w in enumerate(words):
            out.setdefault(w, []).append(i)
        return out

    # the jar's Stage compares words (and stems) by their String.hashCode
    key1, key2 = [java_hash(w) for w in test], [java_hash(w) for w in ref]
    # identical sentences need only exact matches ("this prevents beam search errors", Aligner.java)
    modules = data.modules[:1] if key1 == key2 else data.modules
    keys1 = positions(key1)
    for j, k in enumerate(key2):
        for i in keys1.get(k, ()):
            add(j, 1, i, 1, 0)
    if "stem" in modules:  # different words with the same stem
        stem = data.stemmer.stem
        stems1 = positions([java_hash(stem(w)) for w in test])
        for j, w in enumerate(ref):
            for i in stems1.get(java_hash(stem(w)), ()):
                if key1[i] != key2[j]:
                    add(j, 1, i, 1, 1)
    if "synonym" in modules:  # different words sharing a WordNet synset
        syn1 = [data.synonyms(w) for w in test]
        for j, w in enumerate(ref):
            syn2 = data.synonyms(w)
            for i, s in enumerate(syn1):
                if key1[i] != key2[j] and not s.isdisjoint(syn2):
                    add(j, 1, i, 1, 2)
    if "paraphrase" in modules:  # a table phrase in one line whose paraphrase is in the other
        at1, at2 = positions(test), positions(ref)
        for j in range(len(ref)):
            for n, par in data.paraphrases_at(ref, j):
                for i in at1.get(par[0], ()):
                    if tuple(test[i:i + len(par)]) == par:
                        add(j, n, i, len(par), 3)
        for i in range(len(test)):
            for n, par in data.paraphrases_at(test, i):
                for j in at2.get(par[0], ()):
                    if tuple(ref[j:j + len(par)]) == par:
                        add(j, len(par), i, n, 3)
    return cands, cover1, cover2


def _mask(start, n):
    return ((1 << n) - 1) << start


class _Path:
    """A partial alignment in the beam (PartialAlignment.java), with what the search ranks it by."""
    __slots__ = ("credit", "chunks", "distance", "idx", "last_end", "used1", "used2", "chosen")

    def __init__(self, used1, used2):
        self.credit, self.chunks, self.distance, self.idx, self.last_end = 0, 0, 0, 0, -1
        self.used1, self.used2, self.chosen = used1, used2, ()  # used words as bit masks; matches taken

    def extended(self, m, mask1, mask2):
        """A new path: this one with match m (whose words are mask1, mask2) added."""
        new = _Path(self.used1 | mask1, self.used2 | mask2)
        new.credit, new.chunks, new.distance, new.idx, new.last_end, new.chosen = \
            self.credit, self.chunks, self.distance, self.idx, self.last_end, (m, self.chosen)
        new.take(m)
        return new

    def take(self, m):
        j, jn, i, i_n, module = m
        w = SEARCH_WEIGHTS[module]
        self.credit += int(i_n * w) + int(jn * w)  # the jar's int sums truncate each addition
        if self.last_end != -1 and i != self.last_end:
            self.chunks += 1  # not contiguous in the test
        self.idx, self.last_end = j + jn, i + i_n

    def rank(self):
        # more (search-weighted) matched words, then fewer chunks, then less distance (PARTIAL_COMPARE_TOTAL)
        return -self.credit, self.chunks, self.distance


def _align(test, ref, data, cfg):
    """The best alignment's matches, one per reference start (Aligner.align + resolve)."""
    cands, cover1, cover2 = _candidates(test, ref, data)
    # a reference word with a single candidate whose words no other candidate touches is matched
    # for sure; the beam search places the rest
    fixed, used1, used2 = [None] * len(ref), 0, 0
    for j, ms in enumerate(cands):
        if len(ms) == 1:
            _, jn, i, i_n, _ = m = ms[0]
            if all(cover2[k] == 1 for k in range(j, j + jn)) and all(cover1[k] == 1 for k in range(i, i + i_n)):
                fixed[j], used1, used2 = m, used1 | _mask(i, i_n), used2 | _mask(j, jn)
    masks = [[(m, _mask(m[2], m[3]), _mask(m[0], m[1])) for m in ms] for ms in cands]
    paths = [_Path(used1, used2)]
    for current in range(len(ref) + 1):
        paths.sort(key=_Path.rank)  # stable, like Collections.sort
        beam, paths = paths[:cfg.beam], []
        for path in beam:
            if current == len(ref):  # close the last chunk
                path.chunks += path.last_end != -1
                paths.append(path)
            elif path.used2 >> current & 1:  # inside a match taken earlier, or at a fixed one
                if current < path.idx:
                    paths.append(path)
                elif fixed[path.idx] is not None:
                    m = fixed[path.idx]
                    path.take(m)
                    path.distance += abs(m[0] - m[2])
                    paths.append(path)
            else:
                for m, mask1, mask2 in masks[current]:
                    if path.used1 & mask1 or path.used2 & mask2:
                        continue
                    paths.append(path.extended(m, mask1, mask2))
                    path.distance += abs(m[0] - m[2])  # sic: the jar adds it to the extended path, not the new one
                if path.last_end != -1:  # or leave this reference word unmatched
                    path.chunks, path.last_end = path.chunks + 1, -1
                path.idx += 1
                paths.append(path)
        if not paths:
            paths = beam[:1]
    best = min(paths, key=_Path.rank)
    matches, chosen = list(fixed), best.chosen
    while chosen:
        m, chosen = chosen
        matches[m[0]] = m
    return matches


# -------------------------------------------------------------------------------------------------
# 5. Statistics and scores: MeteorScorer.getMeteorStats / computeMetrics, MeteorStats.addStats
# The statistics are the 23 numbers of the jar's SCORE answer: test and reference lengths, their
# function words, per module (test content, reference content, test function, reference function)
# matched words, chunks, matched test and reference words.

def _stats(test, ref, data, cfg):
    by_start = _align(test, ref, data, cfg)
    matches = [m for m in by_start if m is not None]
    fw = data.function_words
    func1, func2 = [w in fw for w in test], [w in fw for w in ref]
    stages = [0] * 16
    for j, jn, i, i_n, module in matches:
        for k in range(i, i + i_n):
            stages[4 * module + (2 if func1[k] else 0)] += 1
        for k in range(j, j + jn):
            stages[4 * module + (3 if func2[k] else 1)] += 1
    chunks, j, last_end = 0, 0, -1  # a chunk ends at an unmatched reference word or a jump in the test
    while j < len(ref):
        m = by_start[j]
        if m is None:
            chunks, j, last_end = chunks + (last_end != -1), j + 1, -1
        else:
            chunks += last_end != -1 and m[2] != last_end
            j, last_end = m[0] + m[1], m[2] + m[3]
    chunks += last_end != -1
    return [len(test), len(ref), sum(func1), sum(func2), *stages, chunks,
            sum(m[3] for m in matches), sum(m[1] for m in matches)]


def _perfect(stats):
    """Every word of both sides matched, in one chunk: the jar then sets the fragmentation to 0."""
    return sum(stats[4:20:4]) + sum(stats[6:20:4]) == stats[0] and \
        sum(stats[5:20:4]) + sum(stats[7:20:4]) == stats[1] and stats[20] == 1


def score(stats, cfg=MeteorConfig()):
    """The METEOR score of a statistics list (MeteorScorer.computeMetrics)."""
    t_len, r_len, t_fun, r_fun = stats[:4]
    d, w = cfg.delta, cfg.weights
    # matches weighted by module, content words by delta and function words by 1 - delta
    t_match = sum([stats[4 + 4 * k] * w[k] * d for k in range(4)] +
                  [stats[6 + 4 * k] * w[k] * (1 - d) for k in range(4)])  # summed in the jar's order
    r_match = sum([stats[5 + 4 * k] * w[k] * d for k in range(4)] +
                  [stats[7 + 4 * k] * w[k] * (1 - d) for k in range(4)])
    if t_match == 0 or r_match == 0:
        return 0.0  # the jar's NaN (0 / 0) -> 0
    precision = t_match / (d * (t_len - t_fun) + (1 - d) * t_fun)
    recall = r_match / (d * (r_len - r_fun) + (1 - d) * r_fun)
    fmean = 1.0 / ((1 - cfg.alpha) / precision + cfg.alpha / recall)
    frag = 0.0 if _perfect(stats) else stats[20] / ((stats[21] + stats[22]) / 2)
    return max(fmean * (1 - cfg.gamma * frag ** cfg.beta), 0.0)


def segment_stats(references, prediction, data, cfg=MeteorConfig()):
    """Statistics of one prediction against its best reference (highest score, first on ties);
    texts go through METEOR's own `-norm` tokenisation."""
    test = tokenize(prediction, data.prefixes)
    candidates = (_stats(test, tokenize(ref, data.prefixes), data, cfg) for ref in references)
    return max(candidates, key=lambda stats: score(stats, cfg), default=None)  # max keeps the first of ties


def corpus_score(all_stats, cfg=MeteorConfig()):
    """The corpus score of the jar's EVAL line: statistics summed over segments (a perfect
    segment's single chunk is not counted), then scored once."""
    if not all_stats:
        return 0.0
    total = [sum(col) for col in zip(*all_stats)]
    total[20] = sum(s[20] for s in all_stats if not _perfect(s))
    return score(total, cfg)
