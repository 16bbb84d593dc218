"""lib/ptb.py against pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, in Java), token for token, and
the report scores resting on it against the official route: normalize_word (METEOR only), the Java
PTBTokenizer, then pycocoevalcap's Bleu and the METEOR 1.5 jar.

The corpus, generated here (seeded): report sentences with fragments dropped in; fragments of every
kind (numbers with units, dates, decimals, percentages, ranges, possessives and contractions after
letters and digits, quotes, brackets, slashes, hyphens, ellipses, abbreviations, URLs, e-mail
addresses, SGML tags, smileys, entities, letters with and without combining marks, emoji, control
characters, line breaks) run together or set where the lexer looks around them; random characters;
empty and very long strings. CI runs its first 400 strings; UNIMED_SLOW=1 all 6,000.

The jar reads all texts as one file, a text a line, so what it gives a text can depend on its
neighbours (ptb.py's docstring lists how, with counts on this corpus). Each text is therefore followed
by a sentinel line here, and compared on its first line; the score routes leave those texts out.
Needs Java (and for METEOR pycocoevalcap's METEOR data); skipped with a message otherwise.
"""
import os
import random
import re
import shutil
import subprocess

import pytest

import metrics as M
from lib import meteor, ptb
from test_metrics import PAIRS

CI_SIZE, FULL_SIZE = 400, 6000
BLEU_TOL, METEOR_TOL = 1e-9, 1e-6

RADIOLOGY = [
    "The heart size is normal.", "No focal consolidation, pleural effusion or pneumothorax.",
    "Mild cardiomegaly is unchanged compared to the prior study of 12/05/2020.",
    "There is a 3.5 x 2.1 cm opacity in the right upper lobe, suspicious for malignancy.",
    "Left-sided PICC line (tip at the cavoatrial junction) is unchanged.",
    "ET tube terminates 4.5 cm above the carina; NG tube courses below the diaphragm.",
    "s/p CABG with intact median sternotomy wires.", "Degenerative changes of the T-spine, L4-L5 > L3-L4.",
    "Bibasilar atelectasis; cannot exclude early pneumonia.", "Findings d/w Dr. Smith at 10:30 a.m. on 5/12.",
    "IMPRESSION: 1. No acute cardiopulmonary process. 2. Stable 8-mm nodule (series 3, image 45).",
    "CT chest w/o contrast: 2.3cm RUL mass, SUV max 7.8.",
    "MRI brain: T2/FLAIR hyperintensities, likely chronic small-vessel disease.",
    "Lungs are hyperinflated, consistent w/ COPD.", "AP and lateral views of the chest were obtained.",
    "There's no pneumothorax and the lungs aren't hyperinflated.", "Pt's hx of CHF; r/o PNA.",
    "The patient's 1990's films aren't available.",
    "Compared with the exam from 3/4/19, there is interval improvement.",
    "Ejection fraction ~55-60%.", "BP 120/80 mmHg, HR 72 bpm, SpO2 98% on RA.", "A 5 mm calculus at the UVJ.",
]
PATHOLOGY = [
    "Invasive ductal carcinoma, grade 2/3, measuring 1.8 cm.",
    "Margins are negative (closest margin 0.3 cm, posterior).",
    "Ki-67 proliferation index ~20%.", "ER positive (90%, strong), PR positive (40%), HER2 negative (1+).",
    "Lymph nodes: 0/12 involved.", "pT1c pN0 (sn) M0; AJCC 8th ed.", "Gleason score 3+4=7 (Grade Group 2).",
    "Specimen received in formalin, labeled with the patient's name and MRN.",
    "H&E sections show tubular adenoma w/ low-grade dysplasia.",
    "Mitoses: 3/10 HPF.", "IHC: CK7+, CK20-, TTF-1+, napsin A+.", "No lymphovascular invasion (LVI) identified.",
    "Tumor size: 2.5 x 1.7 x 1.2 cm.", "Diagnosis: benign fibroadipose tissue; no malignancy seen.",
    "Frozen section dx: 'atypical', deferred to permanents.", "See comment.", "Cf. prior biopsy (S19-1234).",
]
FRAGMENTS = {
    "units": ["3.5 cm", "3.5cm", "12 mm", "1,200 mL", "5x3x2 cm", "2.1 x 3.4 cm", "10^9/L", "37.5°C", "120/80 mmHg",
              "0.5mg/kg", "x2.1", "X2.1", "ab2.1", "a1.5b", "T2-weighted", "C3-C4", "L4/L5", "5-10%", "50%", "~3",
              "+/-", ">5", "<=3", "10:30", "1:100", "1/2", "3/4", "1 1/2", "12 3/4", "½", "¼", "⅓", "⅕", "-5", "+5",
              ".5",
              "5.", "1.2.3", "1e-3", "3rd", "2nd", "#3", "$5", "US$5", "€5", "£5", "5¢", "¥100", "5'", "6'2\"", "5 ft",
              "(555) 123-4567", "555-123-4567", "555.123.4567", "+1 555 123 4567", "555 1234", "1,000,000",
              "0.001", "3.14159", "-0.5", "1.5-2.0", "2-3", "10-20mm", "3x", "x3", "2.5x3.0cm", "4.5cm.", "7:3",
              "10⁹/L", "m²", "cm³", "H₂O", "CO2", "SpO2", "Na+", "K+", "Ca2+", "pH 7.4", "1,2", "1.2,3", "٣٫٥", "߃",
              "１２"],
    "dates": ["12/05/2020", "2020-05-12", "05-12-20", "5/12", "1/1/2000", "Jan. 5, 2020", "5 Jan 2020", "12.05.2020",
              "1990s", "'90s", "1990's", "90's", "3's and 4's", "the 1800's", "Mar. 3", "Sept. 2019", "mon. 3",
              "Mon. Jan. 5", "10:30:45", "10.30 a.m.", "3 p.m.", "Q3 2019", "FY'19", "'19", "’90s"],
    "apos": ["patient's", "patients'", "Dr. Smith's", "it's", "It's", "isn't", "can't", "won't", "don't", "DON'T",
             "I'm", "we'll", "they've", "she'd", "y'all", "Y'all", "'tis", "'twas", "o'clock", "O'Brien", "d'Alembert",
             "D'Alembert", "l'hôpital", "rock'n'roll", "'em", "'cause", "ain't", "cannot", "Cannot", "gonna", "wanna",
             "gotta", "lemme", "gimme", "T2's", "x2's", "CT's", "MRI's", "5's", "n't", "'s", "'S", "' s", "s'", "'",
             "it’s", "isn’t", "don‘t", "patient’s", "it`s", "ol'", "li'l", "c'mon", "ma'am", "shi'ite", "'til",
             "'till", "cont'd", "nat'l", "ev'ry", "e'er", "somethin'", "nor'easter", "Cap'n", "c'est", "I'd've",
             "'re", "'ll", "'ve", "'d", "'m", "x's", "X's", "a's", "I's", "q'x", "'90", "'45 x", "'5", "hello'world",
             "it's.", "it's,", "Xs'", "jones'", "O'o", "o'o", "y'know", "n'", "'n'", "'n", "l'", "j'accuse",
             "&apos;s", "it&apos;s", "don&apos;t"],
    "quotes": ['"', "'", "“", "”", "‘", "’", "«", "»", "‚", "„", "‛", "‟", "‹", "›", "`", "``", "''", "&quot;",
               "&apos;",
               '"quoted"', "'single'", "“curly”", "‘curly’", "«guillemets»", "`latex''", '"5"', "\"A", "'a", "'A'"],
    "brackets": ["(", ")", "[", "]", "{", "}", "<", ">", "-LRB-", "-rrb-", "(x)", "[1]", "{a}", "(3)", "<<", ">>",
                 "(i)", "(ii)", "((2))", "(-5)", "[sic]", "(L>R)", "(+)", "(-)"],
    "slash": ["/", "\\", "and/or", "s/p", "w/o", "r/o", "AP/PA", "T1/T2", "a/b/c", "1/2/3", "x/y-z", "n/v/d",
              "he/she", "km/h", "mg/dL", "\\/", "a\\/b", "//", "http://", "w/", "/s"],
    "hyphen": ["-", "--", "---", "----", "-----", "–", "—", "―", "‐", "‑", "_", "__", "left-sided", "non-contrast",
               "x-ray", "X-Ray", "follow-up", "pro-", "anti-", "re-demonstrated", "well-circumscribed", "T-cell",
               "-x", "x-", "x--y", "a-b-c-d", "3-D", "3-D-like", "co-ed", "e-mail", "U.S.-based", "non-U.S.",
               "Canada-U.S.", "ex-smoker", "anti-inflammatory", "mid-to-lower", "--x", "x---y", "a_b", "a__b",
               "o'clock-ish", "d'x-l'y", "well‐defined", "non‑specific", "A-1", "B-12", "1-A"],
    "dots": ["...", "....", ".....", "......", ". . .", ". . . .", "…", "\x85", "..", "!!", "?!", "!?", "???", "!",
             "?", ".", ",", ";", ":", "a..b", "x...", "...x", "etc...", "ok.", "Ok..", "¿", "¡", "。", "、", "．"],
    "abbrev": ["Dr.", "dr.", "DR.", "Mr.", "Mrs.", "Ms.", "e.g.", "i.e.", "U.S.", "u.s.", "etc.", "vs.", "vs", "cf.",
               "approx.", "No. 5", "no.5", "nos. 3", "fig. 3", "Fig.3a", "figs. 2", "ca. 5", "pp. 12", "art. 3",
               "a.m.", "p.m.", "St.", "Inc.", "Co. Ltd", "Pty. Ltd", "co. lim", "Jan.", "Ph.D.", "p.o.", "q.d.",
               "b.i.d.", "I.", "A.", "U.S.A.", "U.K.", "Jr.", "Sr.", "Calif.", "Mass.", "Pa.", "Wash.", "Gov.",
               "Prof.", "Sen.", "Rep.", "Gen.", "Col.", "Lt.", "Sgt.", "Capt.", "Ave.", "Blvd.", "Rd.", "Mt.",
               "Ft.", "Bros.", "Corp.", "Ltd.", "Dept.", "Univ.", "Assn.", "est.", "tel.", "ext.", "sq.",
               "al.", "seq.", "Bldg.", "a.k.a.", "Alex.", "Wm.", "Jos.", "Ph.", "pt.", "dx.", "hx.", "mm.",
               "Sat.", "Sun.", "May.", "Fri.", "Tues.", "Sept.", "Oct.", "Pty.", "Adm.", "Msgr.", "Supt.",
               "C.D.s", "S&P-500", "S&Ls", "c++", "C#", "f#", "x.", "U.S", "U.S.S.R.", "E.U.", "Sino-U.S.",
               "non-U.S.", "Korean-U.S.", "U.S.-U.K.", "Ph.D", "Ed.D.", "i.e", "e.g", "Nov.5", "Dr.Smith"],
    "web": ["www.example.com", "http://x.org/a?b=c", "https://ex.com/a.", "HTTP://EX.COM/", "foo@bar.com",
            "<foo@bar.com>", "&lt;foo@bar.com&gt;", "radiology.org", "a.b.c.net", "report.pdf", "image.png",
            "scan.dcm", "file.txt.", "notes.doc,", "data.tar.gz", "x.c", "ftp://a.b/c", "www.a.b.co.uk/x/y.",
            "user.name+tag@mail.example.org", "a@b", "a@b.", "@", "user@", "x.y.com/path.html?q=1",
            "pubmed.gov", "www.ncbi.nlm.nih.gov/pubmed/123", "README.md", "setup.py", "a.java", "Q1.2.html"],
    "sgml": ["<b>", "</b>", "<br/>", "<br />", "<a href='x'>", "<!-- c -->", "<p class=\"x\">", "<3", "<x y z>",
             "<a b='>' c>", "<?xml version=\"1.0\"?>", "<!DOCTYPE html>", "<img src=\"a.png\" />", "</ a>",
             "<1>", "< b>", "<b >", "<a_b:c.d-e>", "<a b=c>"],
    "smiley": [":)", ":-(", ";)", ":D", ":P", "=)", "^_^", "-_-", "(^_^)", "x_x", "X_X", ":'(", ":-)", ":o)", ":]",
               "=D", ">:(", "<:)", "(-_-)", "^.[^x=~<>]", "(^.^)", "(>_<)", "o_O", "'_'", ":|", ":\\", ":{", ":@",
               ":-*", ":P)", ":p", ";-)", "=]"],
    "entity": ["&amp;", "&lt;", "&gt;", "&nbsp;", "&eacute;", "caf&eacute;", "na&iuml;ve", "&mdash;", "&ndash;",
               "&MD;", "&#39;", "&#8212;", "AT&T", "S&P", "R&D", "Q&A", "A&amp;B", "at&t", "&HT;", "&odq;",
               "&Auml;rzte", "&ouml;", "&aacute;b", "&amp;amp;", "&", "&&", "A&B&C", "A+B", "C++"],
    "marks": ["@user", "#tag", "#1", "##", "@@", "***", "*", "\\*", "\\*\\*", "**bold**", "__", "@", "#", "$",
              "%", "^", "~", "|", "||", "=", "==", "+", "++", "&", "*x*", "_x_", "@_@", "#x#", "$$", "1$", "$1.50"],
    "symbols": ["±", "×", "÷", "°", "µ", "μ", "²", "³", "¹", "⁻¹", "₂", "≥", "≤", "≠", "→", "←", "⇒", "•", "·", "§",
                "©", "®", "™", "‰", "¦", "¬", "¯", "´", "¨", "¸", "¤", "¢", "£", "€", "¥", "₹", "₩", "₽", "₿", "฿",
                "∑", "∞", "√", "∆", "Ω", "Å", "℃", "℉", "№", "⅓", "⅔", "⅛", "Ⅻ", "①", "♥", "★", "✓", "✔", "☐",
                "■", "□", "▪", "►", "◆", "‣", "⁃", "※", "†", "‡", "⸺", "⸮", "\u2e3a", "\u2e40", "⁄", "∕", "／"],
    "letters": ["naïve", "café", "résumé", "Ångström", "Straße", "STRASSE", "Øresund", "İstanbul", "İ", "ı", "ﬁle",
                "Σίσυφος", "ΣΑΣ", "ΟΔΟΣ.", "ŒUF", "Ḿ", "москва", "МОСКВА", "القلب", "לב", "心脏", "심장", "हृदय",
                "ใจ", "cafe\u0301", "na\u0308ive", "n\u0303", "I\u0307stanbul", "x\u0610y", "க்ஷ", "ǅ", "ǈ",
                "ŉ", "ß", "ẞ", "\u0560x", "x\u0560", "Ꞵ", "ꟊ", "ＡＢＣ", "ａｂｃ", "ȷ", "ɐ", "ʔ", "ˀ", "ˢ", "ꜳ",
                "ǰ", "ΐ", "ﬀ", "ᾈ", "Ϊ", "ς", "σ", "ΑΣ'", "ΑΣ's", "Ⓐ", "ⓐ", "ᴀ", "ℓ", "K", "Å",
                "e\u0301\u0301", "a\u0300-b\u0301", "x\u036fy", "\u0301x", "x\u20d7", "a\u0489", "o\u0338",
                "z\u0336z", "ä\u0308", "ſ", "ﬆ", "ǲ", "ᏸ", "ꭰ", "ᲀ", "ꙋ", "ǆ", "Ǆ", "\u1885x", "ᠠᡳ",
                "𝐀𝐁", "𝑥", "𠀀", "𐐀", "x\U0001d400y", "ᎠᏓ", "ⴀ", "Ⴀ", "ᲐᲑ", "\u08a0", "\u08a1", "\u9fcc", "\u9fcd"],
    "emoji": ["😀", "👍🏽", "❤️", "❤", "🇺🇸", "👨‍👩‍👧", "✓", "☺", "☹", "©️", "🙂🙂", "x😀y", "😀.", "(😀)",
              "#️⃣", "1️⃣", "🏥", "🫁", "\U0001f9e0", "⚕️", "☢", "♻️", "🔬x"],
    "control": ["\x00", "\x01", "\x07", "\x08", "\t", "\x1b", "\x1c", "\x1d", "\x1e", "\x1f", "\x7f", "\x80",
                "\x81", "\x8d", "\x91", "\x92", "\x93", "\x94", "\x96", "\x97", "\x9f", "\u00ad", "\u200b",
                "\u200c", "\u200d", "\u200e", "\u200f", "\u2060", "\ufeff", "\u00a0", "\u2009", "\u3000",
                "\u2002", "\u202f", "\u205f", "\u1680", "\u180e", "\ufffd", "\ufffe", "\uffff", "\ue000"],
    "breaks": ["\r", "\x0b", "\x0c", "\u2028", "\u2029", "\n", "\r\n", "\x85"],
}
ASCII = [chr(i) for i in range(32, 127)]
UNICODE = [c for frag in ("letters", "symbols", "quotes", "control", "hyphen") for f in FRAGMENTS[frag] for c in f]
WORDS = " ".join(RADIOLOGY + PATHOLOGY).split()


def _case(rng, s):
    r = rng.random()
    return s.upper() if r < 0.1 else s.title() if r < 0.2 else s.lower() if r < 0.3 else s


def _fragment(rng, kinds):
    kind = rng.choice(kinds)
    return rng.choice(FRAGMENTS[kind]) if kind in FRAGMENTS else rng.choice(WORDS)


def _glue(rng, kinds):
    """Fragments and words run together, or joined by one punctuation mark or space: where tokenisers differ."""
    seps = ["", "", " ", "  ", ".", ",", "-", "/", "'", "’", ":", ";", "(", ")", '"', "!", "?", "&", "_", "@", "*",
            "\u00a0"]
    return rng.choice(seps).join(_case(rng, _fragment(rng, kinds)) for _ in range(rng.randint(1, 4)))


def _report(rng, kinds):
    """Report sentences with fragments dropped in between words."""
    sentences = [rng.choice(RADIOLOGY if rng.random() < 0.6 else PATHOLOGY) for _ in range(rng.randint(1, 4))]
    words = " ".join(sentences).split(" ")
    for _ in range(rng.randint(0, 4)):
        k = rng.randint(0, len(words))
        words.insert(k, _glue(rng, kinds) if rng.random() < 0.5 else _fragment(rng, kinds))
    return " ".join(words)


def _noise(rng):
    """Random characters, mostly ASCII, some from the unicode pools."""
    return "".join(rng.choice(ASCII) if rng.random() < 0.7 else rng.choice(UNICODE) for _ in range(rng.randint(1, 40)))


def _context(rng, kinds):
    """One fragment in the places where the lexer looks around it: alone, at the end of a sentence,
    before a capital, a digit, a bracket or a comma."""
    frag = _case(rng, _fragment(rng, kinds))
    return rng.choice(["{}", "{}.", "{} The end", "{} the end", "{} 5", "({})", "{},", "{};", "{}:", "a {} b",
                       "{}\u00a0x", "{}'s", "{}s", "x{}", "{}x", "{}.5", "{}-x", "{}/x", '"{}"', "'{}'", "{} .",
                       "{}!", "{}?", "{}...", "{} <b>", "{}\t", "{}  ", "  {}"]).format(frag)


def corpus(n, seed=0):
    """n varied strings (deterministic): report sentences, fragments of every kind run together, random
    characters, fragments in context, a few empty and very long strings."""
    rng = random.Random(seed)
    all_kinds = sorted(FRAGMENTS) + ["word"] * 4
    plain_kinds = [k for k in all_kinds if k != "breaks"]
    out = ["", " ", "\t", "  \u00a0 "]
    while len(out) < n:
        r = rng.random()
        kinds = all_kinds if rng.random() < 0.05 else plain_kinds
        if r < 0.30:
            out.append(_report(rng, kinds))
        elif r < 0.55:
            out.append(_glue(rng, kinds))
        elif r < 0.70:
            out.append(_noise(rng))
        elif r < 0.97:
            out.append(_context(rng, kinds))
        elif r < 0.985:
            out.append(" ".join(_report(rng, kinds) for _ in range(rng.randint(30, 120))))  # very long
        else:
            out.append(rng.choice(["", " ", "\u200b", "\x00", "."]))
    return out[:n]


CORPUS = corpus(FULL_SIZE)

HAND = [  # the issue's examples, and hand-picked edge cases (formerly in tests/test_metrics.py)
    "stable since the 1990's", "the 90's, 3's and 4's", "it 's fine 's", "x2.1 cm", "İstanbul", "I\u0307stanbul",
    "There's no focal consolidation; lungs aren't hyperinflated, can't see it. I'm sure we'll do it, don't you?",
    "Left-sided PICC line (tip at the cavoatrial junction) is unchanged: 3.5 cm, 1,000 mL, 12/05/2020 at 10:30 a.m.",
    "\"Quoted\" text and 'single quotes' with `backticks` and -- dashes ... ellipsis... etc.",
    "Naïve café résumé — em dash – en dash “curly” ‘quotes’ … 5° 10×20 μm ½ €5",
    "e-mail: john.doe@example.com {braces} [brackets] & 50% $5 #3 +/- 1/2 3/4 a/b !! ?! **",
    "U.S. Dr. Mr. etc. vs. e.g. i.e. No. 5 Fig. 3B T12-L1 C3-4 x-ray 2.5x3.0cm AP/PA p.o. q.d.",
    "cannot gonna wanna gotta 'tis y'all o'clock '90s its' James' hello'world",
    "-5 +5 .5 5. 5.0. -0.5 1,000,000 1.2.3 3-4 3/4/5 10:30:45 1st 2nd 1990s 5mm 5-mm 2x3 2*3 ~5 >5 <5 =5",
    "jan. feb. mon. sept. ave. blvd. jr. inc. co. st. prof. mt. gen. cf. fig. the no. the pt. dx. mm.",
    "-x x- x-- --x x--y (x) <b>bold</b> x|y x\\y ^x ø æ ß ñ αβγ 10μm ±2 x² · • → ©",
] + [t for pair in PAIRS for t in pair]

LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029]")  # where the jar ends a line ("\n" is made a space)
SENTINEL = "\"'zqxsentinelzqx"  # its quotes close no SGML attribute left open: no tag runs past it


def java_ptb(texts, after=()):
    """pycocoevalcap's PTBTokenizer run once on all texts, each followed by the lines `after`, then by
    SENTINEL: the lines the official route gives each text (more than one after a line break; it would
    give the first to the text, the others to the texts after it)."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed (pycocoevalcap's PTBTokenizer needs it)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = [c for t in texts for c in (t, *after, SENTINEL)]
    captions += [""] * sum(len(LINE_BREAKS.findall(t)) for t in texts)  # it drops lines past the last text
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    blocks, start = [], 0
    for i in range(len(captions)):
        if out[i][0] == "zqxsentinelzqx":
            blocks.append([out[k][0] for k in range(start, i)])
            start = i + 1
    assert len(blocks) == len(texts)
    return blocks


def _check_tokens(texts):
    blocks = java_ptb(texts)
    wrong = [(t, b[0], ptb.ptb_tokenize(t)) for t, b in zip(texts, blocks) if ptb.ptb_tokenize(t) != b[0]]
    assert not wrong, f"{len(wrong)} of {len(texts)}:\n" + "\n".join(
        f"{t[:300]!r}\n  java: {j[:300]!r}\n  ours: {o[:300]!r}" for t, j, o in wrong[:20])


def test_the_corpus_has_every_kind():
    assert len(CORPUS) == FULL_SIZE and CORPUS == corpus(FULL_SIZE)  # deterministic
    assert sum(len(t) > 5000 for t in CORPUS) >= 50 and sum(not t.strip() for t in CORPUS) >= 20
    head = CORPUS[:CI_SIZE]
    for kind, fragments in FRAGMENTS.items():  # CI's share has each kind of fragment in it
        assert sum(any(f in t for f in fragments) for t in head) >= 5, kind


def test_ptb_tokenize_matches_java():
    _check_tokens(HAND + CORPUS[:CI_SIZE])
    # the issue's cases: 's after a digit and alone, a decimal after letters, a letter with a mark
    assert M.ptb_tokenize("stable since the 1990's") == "stable since the 1990 's"
    assert M.ptb_tokenize("it 's fine 's") == "it 's fine 's"
    assert M.ptb_tokenize("x2.1 cm") == "x2 .1 cm"
    assert M.ptb_tokenize("I\u0307stanbul") == "i\u0307stanbul"


@pytest.mark.slow
def test_ptb_tokenize_matches_java_on_the_whole_corpus():
    _check_tokens(CORPUS)


def java_last(texts, folder):
    """What the jar gives each text as the last line of a file (no line end after it): pycocoevalcap's
    command, with a file of its own for each text (-ioFileList)."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with open(folder / "files", "w") as f:
        for k, t in enumerate(texts):
            (folder / f"{k}.txt").write_bytes(t.replace("\n", " ").encode())
            f.write(f"{folder / f'{k}.txt'} {folder / f'{k}.tok'}\n")
    subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
                    "-ioFileList", str(folder / "files")], check=True, capture_output=True)
    lines = [(folder / f"{k}.tok").read_text(encoding="utf-8").split("\n")[0] for k in range(len(texts))]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS) for line in lines]


@pytest.mark.slow
def test_what_one_text_cannot_tell(tmp_path):
    """The counts of ptb.py's docstring: texts whose tokens depend on the texts around them."""
    blocks = java_ptb(CORPUS)
    first = [b[0] for b in blocks]
    assert sum(len(b) > 1 for b in blocks) == 19  # a line break
    assert sum(f != g for f, g in zip(first, java_last(CORPUS, tmp_path))) == 56  # as the last text
    assert [b[0] for b in java_ptb(CORPUS, after=["\">'>"])] == first  # no tag runs on to a closing quote
    assert [b[0] for b in java_ptb(CORPUS, after=["5"])] == first  # no "no." before a digit


SGML_OPEN = re.compile(r"<[A-Za-z][^<>]*=[ ]*([\"'])(?:(?!\1).)*$", re.S)  # <a href="x, unclosed
ABBREV_END = re.compile(rf"{ptb.ABBREV3}$")  # no. (ca. fig. ...) keeps its period if a digit follows


def _alone(text):
    """Whether a text tokenises alone as among others (see ptb.py's docstring)."""
    return not (LINE_BREAKS.search(text) or SGML_OPEN.search(text) or ABBREV_END.search(text))


def _variant(rng, text):
    """A prediction close to `text`: some words dropped or repeated, sometimes its halves swapped."""
    words = [v for w in text.split(" ") for v in [w] * rng.choice([0, 1, 1, 1, 1, 1, 1, 1, 1, 2])]
    cut = rng.randint(0, len(words)) if rng.random() < 0.3 else 0
    return " ".join(words[cut:] + words[:cut])


def _pairs(texts, seed=0):
    """(reference, prediction) pairs: consecutive texts, and texts with a variant of themselves; only
    texts that tokenise alone as among others, and not empty (eval_caption.py drops those); then a
    plain pair, so that neither side's last text (the jar sees no line end after it) is one of them."""
    rng = random.Random(seed)
    pairs = [(texts[k], texts[k + 1]) if k % 4 == 0 else (texts[k], _variant(rng, texts[k]))
             for k in range(0, len(texts) - 1, 2)]
    pairs = [(r, p) for r, p in pairs if r and p and _alone(r) and _alone(p)]
    return pairs + [("No acute cardiopulmonary process.", "no acute process")]


def official_tokens(texts):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def _check_bleu(pairs, normalise):
    """pycocoevalcap's Bleu(4) on the Java tokenizer's output against metrics.corpus_bleu, for the whole
    corpus and for each pair; the texts raw (eval_caption.py's BLEU) or normalize_word'ed first."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed (pycocoevalcap's PTBTokenizer needs it)")
    from pycocoevalcap.bleu.bleu import Bleu
    refs = [M.normalize_word(r) if normalise else r for r, _ in pairs]
    preds = [M.normalize_word(p) if normalise else p for _, p in pairs]
    gts, res = official_tokens(refs), official_tokens(preds)
    want, want_each = Bleu(4).compute_score({i: [g] for i, g in enumerate(gts)}, {i: [r] for i, r in enumerate(res)},
                                            verbose=0)
    ours = M.corpus_bleu([[r] for r in refs], preds)
    assert max(abs(ours[f"bleu{k + 1}"] - want[k]) for k in range(4)) <= BLEU_TOL, (ours, want)
    each = [M.corpus_bleu([[r]], [p]) for r, p in zip(refs, preds)]
    worst = max((abs(each[i][f"bleu{k + 1}"] - want_each[k][i]), i) for i in range(len(pairs)) for k in range(4))
    assert worst[0] <= BLEU_TOL, (worst, pairs[worst[1]])


@pytest.mark.parametrize("normalise", [False, True], ids=["raw", "normalize_word"])
def test_bleu_matches_the_official_route(normalise):
    _check_bleu(_pairs(CORPUS[:CI_SIZE]), normalise)


@pytest.mark.slow
@pytest.mark.parametrize("normalise", [False, True], ids=["raw", "normalize_word"])
def test_bleu_matches_the_official_route_on_the_whole_corpus(normalise):
    _check_bleu(_pairs(CORPUS), normalise)


@pytest.fixture(scope="module")
def official_meteor():
    """pycocoevalcap's Meteor (the METEOR 1.5 jar, `-l en -norm`), started once."""
    data = meteor.meteor_data()
    if data.folder is None:
        pytest.skip("pycocoevalcap's METEOR data (meteor-1.5.jar, data/paraphrase-en.gz) not found")
    if shutil.which("java") is None:
        pytest.skip("java is not installed (the METEOR 1.5 jar needs it)")
    from pycocoevalcap.meteor.meteor import Meteor
    jar = Meteor()
    yield jar, data
    jar.meteor_p.kill()
    jar.meteor_p.wait()


def _check_meteor(official_meteor, pairs):
    """The jar on normalize_word'ed texts tokenised by the Java tokenizer (eval_caption.py's METEOR)
    against metrics.meteor, for the whole corpus and for each pair."""
    jar, data = official_meteor
    gts = official_tokens([M.normalize_word(r) for r, _ in pairs])
    res = official_tokens([M.normalize_word(p) for _, p in pairs])
    want, want_each = jar.compute_score({i: [g] for i, g in enumerate(gts)}, {i: [r] for i, r in enumerate(res)})
    assert M.meteor([[r] for r, _ in pairs], [p for _, p in pairs], data) == pytest.approx(want, abs=METEOR_TOL)
    worst = max((abs(M.meteor([[r]], [p], data) - want_each[i]), i) for i, (r, p) in enumerate(pairs))
    assert worst[0] <= METEOR_TOL, (worst, pairs[worst[1]])


def test_meteor_matches_the_official_route(official_meteor):
    issue = ("stable since the 1990's", "stable since the 1990 s")  # "1990 's" is not "1990 s" (0.4402)
    assert M.meteor([[issue[0]]], [issue[1]], official_meteor[1]) == pytest.approx(0.4402, abs=1e-4)
    _check_meteor(official_meteor, [issue] + _pairs(CORPUS[:CI_SIZE]))


@pytest.mark.slow
def test_meteor_matches_the_official_route_on_the_whole_corpus(official_meteor):
    _check_meteor(official_meteor, _pairs(CORPUS))
