"""The twelve Uni-Med datasets, the training mixture, batching, and a learnable built-in demo.

Uni-Med trains one model on six tasks (Table 1): question answering [qa], visual question answering
[vqa], report generation [caption], referring expression comprehension [refer] and generation
[identify], and image classification [cls]. Each dataset is read from the files exactly as they are
distributed (layouts in the spec, section 7) and every row becomes one plain `Sample`: an image (or
None), the templated instruction (it starts with the task identifier; the `<Img><ImageHere></Img>`
wrapper is added by model.py), the answer, and for the referring tasks the box.

Training draws one dataset per step by the paper's ratios and a batch of 4 from it (`Mixture`), with
a training template picked at random per sample; evaluation uses the fixed evaluation instruction.
Everything random comes from a seed, and the sampler's state goes into checkpoints.

Run `python data.py make-demo DIR` to write a miniature of every dataset in its official layout,
with procedurally drawn images whose content decides the answers (see `make_demo`).
"""
import csv
import io
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import files


# -------------------------------------------------------------------------------------------------
# Records

@dataclass
class Sample:
    id: str
    dataset: str
    task: str                                     # qa | vqa | caption | refer | identify | cls
    image: Optional[Image.Image]                  # RGB, original size; None for text-only QA
    instruction: str                              # "[vqa] Based on the image, ...: what ...", no <Img>
    answer: str
    box: Optional[tuple] = None                   # ground truth (x, y, w, h) in pixels (refer/identify)
    image_size: Optional[tuple] = None            # (W, H) of the original image
    answer_type: Optional[str] = None             # OPEN | CLOSED for the VQA sets


@dataclass
class Batch:
    images: Optional[torch.Tensor]                # [B, 3, S, S], or None for a QA batch
    instructions: list
    answers: list
    task: str


# -------------------------------------------------------------------------------------------------
# Text processing (spec section 6, the official `blip_caption_new`)

def process_text(text: str, max_words: int = 50) -> str:
    """Collapse runs of 2+ whitespace to one space, strip, keep the first 50 space-separated words.

    Exactly the official processor: a *single* tab or newline is left alone, case is kept.
    """
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


# -------------------------------------------------------------------------------------------------
# Datasets, tasks, ratios and instruction templates (spec sections 5 and 7, quoted exactly)

DATASETS = ("medqa", "pubmedqa", "slake_vqa", "path_vqa", "mimic_cxr", "medpix", "slake_rec",
            "slake_reg", "sa_med2d_rec", "sa_med2d_reg", "dermamnist", "organsmnist")
MEDMNIST = ("dermamnist", "organsmnist")  # one mixture member "medmnist" in training (ConcatDataset)

TASK_OF = {"medqa": "qa", "pubmedqa": "qa", "slake_vqa": "vqa", "path_vqa": "vqa",
           "mimic_cxr": "caption", "medpix": "caption", "slake_rec": "refer", "slake_reg": "identify",
           "sa_med2d_rec": "refer", "sa_med2d_reg": "identify", "dermamnist": "cls",
           "organsmnist": "cls", "medmnist": "cls"}

# Sampling ratios of the training mixture (spec section 7); a step draws a dataset in proportion.
RATIOS = {"medqa": 2, "pubmedqa": 2, "slake_vqa": 5, "path_vqa": 5, "slake_rec": 4, "slake_reg": 4,
          "sa_med2d_rec": 4, "sa_med2d_reg": 4, "medpix": 8, "mimic_cxr": 8, "medmnist": 4}

_VQA = ["[vqa] {}", "[vqa] Based on the image, respond to this question with a short answer: {}"]
_REFER = ["[refer] {}", "[refer] give me the location of {}", "[refer] where is {} ?",
          "[refer] from this image, tell me the location of {}", "[refer] the location of {} is",
          "[refer] could you tell me the location for {} ?", "[refer] where can I locate the {} ?"]
_IDENTIFY = ["[identify] {}", "[identify] what object is in this location {}",
             "[identify] identify the object present at this location {}", "[identify] what is it in {}",
             "[identify] describe this object in {}", "[identify] this {} is", "[identify] the object in {} is"]
_DERMA = ("Which category does this multi-source dermatoscopic image of common pigmented skin "
          "lesions belong to: actinic keratoses and intraepithelial carcinoma, basal cell carcinoma, "
          "benign keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevi, or vascular lesions?")
_ORGANS = ("Which category does this CT image belong to: bladder, left femur, right femur, heart, "
           "left kidney, right kidney, liver, left lung, right lung, pancreas, or spleen?")
_MIMIC = ["[caption] " + t for t in (
    "Describe the given chest x-ray image in detail.",
    "Take a look at this chest x-ray and describe the findings and impression.",
    "Could you provide a detailed description of the given x-ray image?",
    "Describe the given chest x-ray image as detailed as possible.",
    "What are the key findings in this chest x-ray image?")]
_MEDPIX = ["[caption] " + t for t in (
    "Describe this input image.", "Help captioning the image.", "What can be inflected from the scan?",
    "Can you give a caption for this image?", "Can you provide a brief summary of the radiology image?",
    "Please write a report about the image?", "Can you provide an analysis of this image?",
    "Can you explain what is shown in this image?", "What can be indicated from the radiologic scans?",
    "What can you infer from this photograph?")]

# name -> (training templates, evaluation instruction). The caption evaluation instructions end with
# a space, as in the official eval scripts. The paper does not evaluate QA; we use the instruction
# that states the expected answer form.
_MEDQA = ["[qa] {}", "[qa] If you are a doctor, please answer the following question briefly: {}"]
_PUBMEDQA = ["[qa] {}", "[qa] If you are a doctor, please answer the following question using 'yes', 'no' or "
                        "'maybe': {}"]
TEMPLATES = {
    "medqa": (_MEDQA, _MEDQA[1]), "pubmedqa": (_PUBMEDQA, _PUBMEDQA[1]),
    "slake_vqa": (_VQA, _VQA[1]), "path_vqa": (_VQA, _VQA[1]),
    "mimic_cxr": (_MIMIC, "[caption] Describe the given chest x-ray image in detail. "),
    "medpix": (_MEDPIX, "[caption] Describe this input image. "),
    "slake_rec": (_REFER, _REFER[1]), "sa_med2d_rec": (_REFER, _REFER[1]),
    "slake_reg": (_IDENTIFY, _IDENTIFY[1]), "sa_med2d_reg": (_IDENTIFY, _IDENTIFY[1]),
    # MedMNIST: the official code writes "[cls] {}".format(question); the slot is the question
    **{name: (["[cls] {}"], "[cls] {}") for name in ("dermamnist", "organsmnist", "medmnist")},
}
CLS_QUESTIONS = {"dermamnist": _DERMA, "organsmnist": _ORGANS}

# MedMNIST label index -> answer text ("-left"/"-right" names become "left X"/"right X").
CLASS_NAMES = {
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "organsmnist": ["bladder", "left femur", "right femur", "heart", "left kidney", "right kidney",
                    "liver", "left lung", "right lung", "pancreas", "spleen"],
}


# -------------------------------------------------------------------------------------------------
# Boxes: pixels <-> the "{<x1><y1><x2><y2>}" text on a 0-100 grid

def box_to_text(box, image_size) -> str:
    """[x, y, w, h] pixels of a (W, H) image -> "{<x1><y1><x2><y2>}" on the 0-100 grid.

    Each coordinate is truncated with int() as the official code does (floor for positives).
    """
    (x, y, w, h), (W, H) = box, image_size
    grid = [int(x / W * 100), int(y / H * 100), int((x + w) / W * 100), int((y + h) / H * 100)]
    return "{{<{}><{}><{}><{}>}}".format(*grid)


_BOX_RE = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


def parse_box(text: str) -> Optional[tuple]:
    """A generated answer -> (x1, y1, x2, y2) on the 0-100 grid, or None (the official REC parse).

    `<unk>` and all spaces are removed; the text must then *start* with {<d><d><d><d>} (1-3 digits
    each); anything after it is ignored. Scaling to pixels (x * W / 100) is left to evaluation.
    """
    text = text.replace("<unk>", "").replace(" ", "").strip()
    if not _BOX_RE.match(text):
        return None
    return tuple(int(n) for n in re.findall(r"\d+", text)[:4])


# -------------------------------------------------------------------------------------------------
# Reading files (files.py names the file when it cannot be read; here the dataset and row are named)

def _need(path, dataset, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: expected {what} at {path}, which does not exist")
    return path


def _read_json(path, dataset, what):
    return files.read_json(_need(path, dataset, what))


def _field(row, key, kind, where):
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"{where}: malformed row, missing key '{key}'")
    if not isinstance(row[key], kind):
        raise ValueError(f"{where}: malformed row, '{key}' should be {kind.__name__}, got "
                         f"{type(row[key]).__name__}")
    return row[key]


# -------------------------------------------------------------------------------------------------
# One dataset = a list of rows + the instruction templates; images are opened in get()

@dataclass
class Row:
    id: str
    where: str                        # "file, row N" for error messages
    slot: str = ""                    # what fills "{}" in the template (question / object name)
    answer: str = ""
    image: object = None              # image path, or (images array, index) for MedMNIST
    box: Optional[list] = None        # [x, y, w, h] pixels
    answer_type: Optional[str] = None


class TaskDataset(torch.utils.data.Dataset):
    """Rows of one dataset. `get(i, template)`: template index into the training list, or None for
    the evaluation instruction; `ds[i]` is `get(i)`."""

    def __init__(self, name, rows):
        self.name, self.task, self.rows = name, TASK_OF[name], rows
        self.templates, self.eval_template = TEMPLATES[name]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.get(i)

    def image_file(self, row, read):
        """read(row.image) for an image file, its errors naming the dataset and the row too."""
        try:
            return read(row.image)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name}: {row.where}: image not found at {row.image}") from None
        except ValueError as e:
            raise ValueError(f"{self.name}: {row.where}: {e}") from None

    def load_image(self, row) -> Image.Image:
        if isinstance(row.image, str):
            return self.image_file(row, files.read_image)
        images, index = row.image  # MedMNIST: read and checked when the dataset was loaded
        return Image.fromarray(images[index]).convert("RGB")

    def check_box(self, row, size) -> None:
        (x, y, w, h), (W, H) = row.box, size
        # 1 pixel of slack: pixel-inclusive annotations can end at W or H exactly
        if x < 0 or y < 0 or w < 0 or h < 0 or x + w > W + 1 or y + h > H + 1:
            raise ValueError(f"{self.name}: {row.where}: box [x, y, w, h] = {row.box} lies "
                             f"outside the {W}x{H} image {row.image}")

    def check_row(self, row, sizes: dict) -> Optional[str]:
        """What get() would fail on for this row, found without decoding pixels (None: nothing):
        its image is missing, its header does not decode or the file is cut short, its box lies
        outside the image. Parsing and keys were checked when the rows were loaded, and so were the
        MedMNIST arrays. `sizes` (image path -> (W, H), or None once its problem is reported)
        is shared by all rows, so an image that many rows ask about is read and reported once."""
        if not isinstance(row.image, str):
            return None
        try:
            if row.image not in sizes:
                sizes[row.image] = None  # until it is read: a problem is reported by the first row only
                sizes[row.image] = self.image_file(row, files.read_image_size)
            if sizes[row.image] is not None and row.box is not None:
                self.check_box(row, sizes[row.image])
        except (ValueError, OSError) as e:
            return str(e)
        return None

    def get(self, i, template: Optional[int] = None) -> Sample:
        row = self.rows[i]
        image = None if row.image is None else self.load_image(row)
        slot, answer = row.slot, row.answer
        if self.task in ("refer", "identify"):  # the box text depends on the original image size
            self.check_box(row, image.size)
            text = box_to_text(row.box, image.size)
            slot, answer = (slot, text) if self.task == "refer" else (text, answer)
        fmt = self.eval_template if template is None else self.templates[template]
        instruction = fmt.format(slot)
        if self.task == "qa":  # the official QA sets pass the whole templated instruction through it
            instruction = process_text(instruction)
        return Sample(row.id, self.name, self.task, image, instruction, answer, row.box and tuple(row.box),
                      None if image is None else image.size, row.answer_type)


# -------------------------------------------------------------------------------------------------
# The loaders: official files -> rows (text processed where the official code processes it)

def _medqa(p, split, name):
    path, rows = _need(p["questions"], name, "the MedQA jsonl"), []
    for n, row in files.read_jsonl(path):
        where = f"{path}, row {n}"
        rows.append(Row(f"{name}/{split}/{n}", where, _field(row, "question", str, where),
                        process_text(_field(row, "answer", str, where))))
    return rows


def _pubmedqa(p, split, name):
    path, rows = p["questions"], []
    for key, row in _read_json(path, name, "the PubMedQA json").items():
        where = f"{path}, key {key}"
        rows.append(Row(f"{name}/{key}", where, _field(row, "QUESTION", str, where),
                        process_text(_field(row, "final_decision", str, where))))
    return rows


def _slake_folders(p, split, name):
    path = _need(os.path.join(p["dir"], f"{split}.txt"), name, "the Slake split list")
    return files.read_text(path, "Slake split list").split()


def _slake_vqa(p, split, name):
    rows = []
    for folder in _slake_folders(p, split, name):
        path = os.path.join(p["dir"], "imgs", folder, "question.json")
        for n, q in enumerate(_read_json(path, name, f"questions of image folder {folder}")):
            where = f"{path}, row {n}"
            if _field(q, "q_lang", str, where) != "en" or len(_field(q, "answer", str, where)) == 0:
                continue
            rows.append(Row(f"{name}/{folder}/{q.get('qid', n)}", where,
                            process_text(_field(q, "question", str, where)),
                            process_text(q["answer"]),
                            os.path.join(p["dir"], "imgs", _field(q, "img_name", str, where)),
                            answer_type=_field(q, "answer_type", str, where)))
    return rows


def _regions(name, files):
    """Region files (json path, image path, id): lists of one-key dicts {object: [x, y, w, h]}."""
    rows = []
    for path, image, rid in files:
        for n, region in enumerate(_read_json(path, name, f"the region file of {rid}")):
            where = f"{path}, row {n}"
            if not (isinstance(region, dict) and len(region) == 1):
                raise ValueError(f"{where}: malformed row, expected a one-key dict {{object: [x, y, w, h]}}")
            (obj, box), = region.items()
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise ValueError(f"{where}: malformed row, box of '{obj}' should be [x, y, w, h], got {box}")
            obj = process_text(obj)  # REC slot, and (processed again, a no-op) REG answer
            rows.append(Row(f"{name}/{rid}/{n}", where, obj, obj, image, box))
    return rows


def _slake_regions(p, split, name):
    imgs = os.path.join(p["dir"], "imgs")
    return _regions(name, [(os.path.join(imgs, f, "detection.json"), os.path.join(imgs, f, "source.jpg"), f)
                           for f in _slake_folders(p, split, name)])


def _sa_med2d_regions(p, split, name):
    """Every `{regions}/{modality}/{image_id}.json`, image `{images}/{modality}/{image_id}.png`."""
    regions, _ = _need(p["regions"], name, "the region folder"), _need(p["images"], name, "the image folder")
    return _regions(name, [(os.path.join(regions, m, f), os.path.join(p["images"], m, f[:-5] + ".png"),
                            f"{m}/{f[:-5]}") for m in sorted(os.listdir(regions))
                           for f in sorted(os.listdir(os.path.join(regions, m))) if f.endswith(".json")])


def _path_vqa(p, split, name):
    path, rows = _need(p["qas"], name, "the Path-VQA pickle"), []
    data = files.read_plain_pickle(path, "Path-VQA pickle")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of question dicts, got {type(data).__name__}")
    for n, q in enumerate(data):
        where = f"{path}, row {n}"
        img_id, label = _field(q, "img_id", str, where), _field(q, "label", dict, where)
        if not label or not isinstance(next(iter(label)), str):
            raise ValueError(f"{where}: malformed row, 'label' should map the answer text to a score")
        closed = _field(q, "answer_type", str, where) == "yes/no"  # eval_vqa.py's CLOSED subset
        rows.append(Row(f"{name}/{q.get('question_id', n)}", where,
                        process_text(_field(q, "sent", str, where)), process_text(next(iter(label))),
                        os.path.join(p["images"], img_id.split("_")[0], img_id + ".jpg"),
                        answer_type="CLOSED" if closed else "OPEN"))
    return rows


def _with_images(name, path, rows):
    """Drop the rows whose image is missing, as the official MIMIC-CXR and MedPix loaders do."""
    kept = [row for row in rows if os.path.exists(row.image)]
    if len(kept) < len(rows):
        print(f"data: {name}: skipped {len(rows) - len(kept)} rows of {path} whose image is missing",
              file=sys.stderr)
    return kept


def _mimic_cxr(p, split, name):
    path, rows = p["annotation"], []
    table = _read_json(path, name, "the MIMIC-CXR caption annotation")
    if not isinstance(table, dict) or split not in table:
        raise ValueError(f"{path}: malformed file, missing key '{split}'")
    for n, row in enumerate(table[split]):
        where = f"{path}, {split} row {n}"
        images = _field(row, "image_path", list, where)
        if not images or not isinstance(images[0], str):
            raise ValueError(f"{where}: malformed row, 'image_path' should be a non-empty list of paths")
        rows.append(Row(f"{name}/{images[0]}", where, "", process_text(_field(row, "report", str, where)),
                        os.path.join(p["images"], "files", images[0])))
    return _with_images(name, path, rows)


# The default NaN spellings of pandas 1.5.3, the official environment's: its loader, read_csv then
# dropna(), drops every row holding any of them. pandas 2 added "None" to the list; under 1.5.3 a
# cell reading None is kept as the text "None", so such rows are kept here too (spec section 7).
_NAN = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
        "<NA>", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"}


def _medpix(p, split, name):
    path, rows = _need(p["csv"], name, "the MedPix csv"), []
    columns, table = files.read_csv(path, "MedPix CSV")
    absent = [c for c in ("name", "context", "type") if c not in columns]
    if absent:
        raise ValueError(f"{path}: malformed file, missing column(s) {absent}")
    for n, row in enumerate(table):
        # dropna() (a ragged row has None cells), then keep the captions
        if None in row or any(v is None or v in _NAN for v in row.values()) or row["type"] != "caption":
            continue
        rows.append(Row(f"{name}/{row['name']}", f"{path}, row {n}", "", process_text(row["context"]),
                        os.path.join(p["images"], row["name"])))
    return _with_images(name, path, rows)


def _medmnist(p, split, name):
    """MedMNIST+ npz: `{split}_images` (N, S, S[, 3]) uint8 (any S), `{split}_labels` (N, 1).
    Both arrays are read here (an npz member cannot be read in part), so a damaged file is found now."""
    path = _need(p["npz"], name, "the MedMNIST npz")
    arrays = files.read_npz(path, [f"{split}_images", f"{split}_labels"], "MedMNIST .npz")
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    names = CLASS_NAMES[name]
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(f"{path}: '{split}_images' should be (N, S, S) or (N, S, S, 3) uint8, got "
                         f"{images.shape} {images.dtype}")
    if labels.shape != (len(images), 1) or labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"{path}: '{split}_labels' should be (N, 1) with N = {len(images)} and "
                         f"values in [0, {len(names)}), got shape {labels.shape}")
    return [Row(f"{name}/{split}/{n}", f"{path}, {split} index {n}", CLS_QUESTIONS[name],
                process_text(names[int(label)]), (images, n))
            for n, label in enumerate(labels[:, 0])]


LOADERS = {"medqa": _medqa, "pubmedqa": _pubmedqa, "slake_vqa": _slake_vqa, "path_vqa": _path_vqa,
           "mimic_cxr": _mimic_cxr, "medpix": _medpix, "slake_rec": _slake_regions, "slake_reg": _slake_regions,
           "sa_med2d_rec": _sa_med2d_regions, "sa_med2d_reg": _sa_med2d_regions,
           "dermamnist": _medmnist, "organsmnist": _medmnist}


def default_paths(root, split) -> dict:
    """The official layout under one data root (spec section 7); the first path of each dataset
    decides whether it is present at all."""
    j = lambda *parts: os.path.join(root, *parts)
    slake = {"dir": j("Slake-VQA")}
    sa = {"regions": j("SA-Med2D-20M", f"regions_small_{split}"),
          "images": j("SA-Med2D-20M", f"images_small_{split}")}
    return {
        "medqa": {"questions": j("MedQA", "questions", "US", f"{split}.jsonl")},
        "pubmedqa": {"questions": j("PubMedQA", f"{split}_set.json")},
        "slake_vqa": slake, "slake_rec": slake, "slake_reg": slake,
        "path_vqa": {"qas": j("Path-VQA", "qas", f"{split}_vqa.pkl"), "images": j("Path-VQA", "images")},
        # two files: training reads annotation_small.json, eval_caption.py annotation.json (spec 7)
        "mimic_cxr": {"annotation": j("MIMIC_caption", "annotation_small.json" if split == "train"
                                      else "annotation.json"), "images": j("MIMIC-CXR-JPG", "2.0.0")},
        "medpix": {"csv": j("MedPix", "data_csv", f"MedPix_single_{split}.csv"),
                   "images": j("MedPix", "MedPix", "images")},
        "sa_med2d_rec": sa, "sa_med2d_reg": sa,
        "dermamnist": {"npz": j("MedMNIST", "dermamnist_224.npz")},
        "organsmnist": {"npz": j("MedMNIST", "organsmnist_224.npz")},
    }


def load_datasets(root, split, names=None, train=None, paths=None) -> dict:
    """Build the datasets of one split ("train" or "test") found under `root`.

    names: dataset ids (default: all; "medmnist" means both MedMNIST sets). An absent dataset is
    skipped with one warning line, unless it was named, then it is an error.
    train (default: split == "train"): return the training mixture's members, i.e. Derma and OrganS
    joined as "medmnist" like the official ConcatDataset. Templates are chosen by the `Mixture`.
    paths: overrides as {"dataset.key": path}, e.g. {"mimic_cxr.images": "/data/mimic"}.
    """
    train = split == "train" if train is None else train
    wanted = list(DATASETS) if names is None else [n for name in names
                                                   for n in (MEDMNIST if name == "medmnist" else [name])]
    table = default_paths(root, split)
    for key, path in (paths or {}).items():
        name, _, field = key.partition(".")
        if name not in table or field not in table[name]:
            valid = ", ".join(f"{n}.{k}" for n in table for k in table[n])
            raise ValueError(f"unknown data path override '{key}'; valid keys: {valid}")
        table[name] = {**table[name], field: path}
    out = {}
    for name in wanted:
        if name not in LOADERS:
            raise ValueError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
        p = table[name]
        first = next(iter(p.values()))
        if names is None and not os.path.exists(first):
            print(f"data: skipping {name} ({split}): not found at {first}", file=sys.stderr)
            continue
        out[name] = TaskDataset(name, LOADERS[name](p, split, name))
    if train and any(n in out for n in MEDMNIST):  # the official ConcatDataset([Derma, OrganS])
        out["medmnist"] = TaskDataset("medmnist", [r for n in MEDMNIST if n in out for r in out.pop(n).rows])
    return out


def check_datasets(datasets: dict, rank: int = 0, world: int = 1) -> list[str]:
    """Check every row of `datasets` (this process's share of them, rows rank::world) as get() will
    use it, before training starts, so that a bad row stops the run now rather than hours in, when
    the mixture first draws it. Returns every problem found, one line each."""
    work = [(ds, row) for ds in datasets.values() for row in ds.rows[rank::world]]
    problems, sizes = [], {}
    for ds, row in tqdm(work, desc="checking the data", unit="row", disable=rank != 0, leave=False):
        problem = ds.check_row(row, sizes)
        if problem:
            problems.append(problem)
    return problems


# -------------------------------------------------------------------------------------------------
# The training mixture: one dataset per step, drawn by ratio, then a batch from it

class Mixture:
    """The official loader, made resumable: each step picks a dataset with probability
    ratio / sum(ratios) (MultiIterLoader), then takes the next `batch_size` indices of that
    dataset's shuffled order (a DataLoader with shuffle=True, drop_last=True, restarted with a fresh
    shuffle when exhausted: IterLoader). Each sample gets a training template uniformly at random.

    The dataset choices and templates come from one torch.Generator whose state is saved; each
    epoch's order is regenerated from (seed, dataset, epoch). So `state_dict()` is small, loads with
    torch.load(weights_only=True), and a resumed run sees the identical sequence.
    """

    def __init__(self, datasets: dict, ratios: dict = RATIOS, batch_size: int = 4, seed: int = 42):
        unknown = [n for n in datasets if n not in ratios]
        if unknown:
            raise ValueError(f"no sampling ratio for dataset(s) {unknown}; ratios: {ratios}")
        self.names = [n for n in ratios if n in datasets]
        if not self.names:
            raise ValueError("Mixture: no datasets to sample from")
        for n in self.names:
            if len(datasets[n]) < batch_size:
                raise ValueError(f"Mixture: dataset {n} has {len(datasets[n])} samples, fewer than "
                                 f"one batch of {batch_size}")
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed
        self.weights = torch.tensor([float(ratios[n]) for n in self.names])
        self.generator = torch.Generator().manual_seed(seed)
        self.step, self.epoch, self.pos = 0, [0] * len(self.names), [0] * len(self.names)
        self._orders = {}

    def _order(self, k):
        epoch, order = self._orders.get(k, (None, None))
        if epoch != self.epoch[k]:
            # a tuple of ints hashes the same in every process (no hash randomisation for ints)
            g = torch.Generator().manual_seed(hash((self.seed, k, self.epoch[k])) % 2 ** 63)
            order = torch.randperm(len(self.datasets[self.names[k]]), generator=g)
            self._orders[k] = (self.epoch[k], order)
        return order

    def next_batch(self) -> list:
        k = int(torch.multinomial(self.weights, 1, generator=self.generator))
        ds = self.datasets[self.names[k]]
        if self.pos[k] + self.batch_size > len(ds):  # drop_last, then a new epoch of this dataset
            self.epoch[k], self.pos[k] = self.epoch[k] + 1, 0
        idx = self._order(k)[self.pos[k]: self.pos[k] + self.batch_size].tolist()
        self.pos[k] += self.batch_size
        self.step += 1
        templates = torch.randint(len(ds.templates), (self.batch_size,), generator=self.generator)
        return [ds.get(i, int(t)) for i, t in zip(idx, templates)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "names": list(self.names), "batch_size": self.batch_size,
                "step": self.step, "epoch": list(self.epoch), "pos": list(self.pos),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "names", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"Mixture state: '{key}' is {state[key]} in the checkpoint but "
                                 f"{getattr(self, key)} in this run")
        self.step, self.epoch, self.pos = state["step"], list(state["epoch"]), list(state["pos"])
        self.generator.set_state(state["generator"])
        self._orders = {}


# -------------------------------------------------------------------------------------------------
# Batching

def collate(samples: list, image_size: int = 224) -> Batch:
    """Samples of one dataset -> Batch. The task is the first [...] of the first instruction."""
    from vision import preprocess  # lazy: vision.py is only needed once images are batched
    tasks = {re.match(r"\[(\w+)\]", s.instruction).group(1) for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"collate: a batch must hold one task, got {sorted(tasks)} "
                         f"(samples {[s.id for s in samples]})")
    # one task, so either every sample has an image or none does (QA)
    images = None if samples[0].image is None else torch.stack([preprocess(s.image, image_size) for s in samples])
    return Batch(images, [s.instruction for s in samples], [s.answer for s in samples], tasks.pop())


# -------------------------------------------------------------------------------------------------
# The demo: a miniature of every dataset in its official layout, with learnable content.
# What is drawn decides the answer: a bright blob's quadrant answers "which side?" and is the
# referring box, shapes and textures decide the classes, reports are written from the drawn
# findings, and text QA follows a keyword -> answer table. Classes are balanced; train and test
# never share an image, a question or an id.

DEMO_CHANCE = {
    "medqa": "accuracy 25% (4 organs)", "pubmedqa": "accuracy 33% (yes / no / maybe)",
    "slake_vqa": "closed accuracy and F1 50% (every question has 2 answers: left/right, upper/lower)",
    "path_vqa": "closed accuracy and F1 50% (pink/purple, yes/no)",
    "slake_rec": "R@0.5 25% (the box is one of 4 quadrants)", "sa_med2d_rec": "R@0.5 25% (likewise)",
    "slake_reg": "accuracy 50% (tumor / kidney)", "sa_med2d_reg": "accuracy 50% (liver / spleen)",
    "mimic_cxr": "9 reports (normal, or side x zone x size); they share words, so compare BLEU with "
                 "the score of always writing the most frequent training report",
    "medpix": "8 captions (ct/mri x mass/cyst x left/right), and one test caption that reads None, "
              "as some real ones do (not learnable); compare with a constant caption",
    "dermamnist": "accuracy 33% (melanoma / melanocytic nevi / vascular lesions)",
    "organsmnist": "accuracy 33% (bladder / heart / liver)",
}
QUADRANTS = [("left", "upper"), ("right", "upper"), ("left", "lower"), ("right", "lower")]


def _save(path, content):
    """Write bytes, a PIL image (JPEG or PNG by extension) or a JSON object, atomically."""
    if isinstance(content, Image.Image):
        buf = io.BytesIO()
        content.save(buf, "JPEG" if path.endswith(".jpg") else "PNG", quality=92)
        content = buf.getvalue()
    elif not isinstance(content, bytes):
        content = json.dumps(content, indent=1, ensure_ascii=False).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(content)
    os.replace(path + ".tmp", path)


def _npz_bytes(arrays):
    """np.savez stamps the current time into the zip; fixed stamps make the demo byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _canvas(rng, W, H, base, amp=10):
    """A noisy background (so no two images are alike) and a pen to draw on it."""
    pixels = np.asarray(base, np.float32) + rng.normal(0, amp, (H, W, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image, ImageDraw.Draw(image)


def _quadrant_box(q, W, H):
    """[x, y, w, h] pixels of an object filling most of quadrant q."""
    side, level = QUADRANTS[q]
    return [int(W * (0.08 if side == "left" else 0.58)), int(H * (0.08 if level == "upper" else 0.58)),
            int(W * 0.34), int(H * 0.34)]


def _two_objects(rng, draw, i, W, H, shapes):
    """Two objects in different quadrants (the first cycles, so sides are balanced) -> their boxes."""
    qa = i % 4
    qb = int(rng.choice([q for q in range(4) if q != qa]))
    boxes = []
    for q, (kind, fill) in zip((qa, qb), shapes):
        x, y, w, h = box = _quadrant_box(q, W, H)
        if kind == "circle":
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
        elif kind == "ring":
            draw.ellipse([x, y, x + w - 1, y + h - 1], outline=fill, width=max(2, w // 6))
        elif kind == "square":
            draw.rectangle([x + w // 8, y + h // 8, x + w - 1 - w // 8, y + h - 1 - h // 8], fill=fill)
        else:  # diamond
            draw.polygon([(x + w / 2, y), (x + w - 1, y + h / 2), (x + w / 2, y + h - 1), (x, y + h / 2)], fill)
        boxes.append(box)
    return (qa, qb), boxes


def _balanced(rng, pools, n):
    """n items taking the classes in turn, each popped from its shuffled pool: popping makes the
    train and test draws disjoint."""
    for pool in pools:
        rng.shuffle(pool)
    return [pools[i % len(pools)].pop() for i in range(n)]


def _demo_medqa(root, rng, counts):
    organs = {"chest pain": "heart", "a productive cough": "lungs", "yellow skin": "liver",
              "blood in the urine": "kidneys"}
    pools = [[(s, age, sex, days) for age in range(20, 81) for sex in ("man", "woman") for days in range(2, 10)]
             for s in organs]
    options = {"A": "heart", "B": "lungs", "C": "liver", "D": "kidneys"}
    for split, n in counts.items():
        lines = [json.dumps({"question": f"A {age}-year-old {sex} presents with {s} for {days} days. "
                                         "Which organ is most likely affected?",
                             "answer": organs[s], "options": options, "meta_info": "step1",
                             "answer_idx": "ABCD"[list(organs).index(s)]})
                 for s, age, sex, days in _balanced(rng, pools, n)]
        _save(os.path.join(root, "MedQA", "questions", "US", f"{split}.jsonl"), "\n".join(lines).encode() + b"\n")


def _demo_pubmedqa(root, rng, counts):
    effect = {"daily exercise": "yes", "placebo pills": "no", "early surgery": "maybe"}
    diseases = ["asthma", "diabetes", "migraine", "arthritis", "hypertension", "anemia", "obesity", "gout"]
    pools = [[(t, d, pop) for d in diseases for pop in ("elderly", "adult", "young", "pregnant")] for t in effect]
    pmid = 10000000
    for split, n in counts.items():
        table = {}
        for t, d, pop in _balanced(rng, pools, n):
            pmid += int(rng.integers(1, 9999))
            table[str(pmid)] = {"QUESTION": f"Does {t} improve outcomes in {pop} patients with {d}?",
                                "CONTEXTS": [f"We studied {t} in {pop} patients with {d}."],
                                "LONG_ANSWER": f"The answer is {effect[t]}.", "final_decision": effect[t]}
        _save(os.path.join(root, "PubMedQA", f"{split}_set.json"), table)


def _demo_slake(root, rng, counts):
    """Image folders with source.jpg, question.json (VQA, en + zh rows) and detection.json (REC/REG)."""
    base, first, qid = os.path.join(root, "Slake-VQA"), {"train": 0, "test": 500}, 0
    for split, n in counts.items():
        folders = [f"xmlab{first[split] + i}" for i in range(n)]
        for i, folder in enumerate(folders):
            W, H = (64, 64) if i % 3 else (80, 64)
            image, draw = _canvas(rng, W, H, (20, 20, 20))
            draw.ellipse([2, 2, W - 3, H - 3], fill=(70, 70, 70))  # the body
            shapes = [("circle", (245,) * 3), ("square", (150,) * 3)]
            (qa, qb), (tumor, kidney) = _two_objects(rng, draw, i, W, H, shapes)
            asked = [("Which side of the image is the tumor on?", QUADRANTS[qa][0], "OPEN", "en"),
                     ("Is the tumor in the upper or lower part of the image?", QUADRANTS[qa][1], "CLOSED", "en"),
                     ("Which side of the image is the kidney on?", QUADRANTS[qb][0], "OPEN", "en"),
                     ("肿瘤在图像的哪一侧?", "左" if QUADRANTS[qa][0] == "left" else "右", "OPEN", "zh")]
            questions = [{"img_id": first[split] + i, "img_name": f"{folder}/source.jpg", "question": question,
                          "answer": answer, "q_lang": lang, "qid": qid + j, "answer_type": kind, "modality": "CT"}
                         for j, (question, answer, kind, lang) in enumerate(asked)]
            qid += len(asked)
            _save(os.path.join(base, "imgs", folder, "source.jpg"), image)
            _save(os.path.join(base, "imgs", folder, "question.json"), questions)
            _save(os.path.join(base, "imgs", folder, "detection.json"), [{"tumor": tumor}, {"kidney": kidney}])
        _save(os.path.join(base, f"{split}.txt"), "\n".join(folders).encode() + b"\n")


def _demo_path_vqa(root, rng, counts):
    qid = {"train": 100000, "test": 200000}
    for split, n in counts.items():
        qas = []
        for i in range(n):
            colour, nuclei = ("pink", "purple")[i % 2], ("yes", "no")[(i // 2) % 2]
            image, draw = _canvas(rng, 64, 64, (235, 150, 190) if colour == "pink" else (140, 80, 170), 18)
            cx, cy = rng.integers(14, 44, 2)
            for x, y in rng.integers(0, 58, (6, 2)):  # pale cells everywhere
                draw.ellipse([x, y, x + 6, y + 6], fill=(245, 220, 235))
            for x, y in rng.integers(-10, 10, (9 if nuclei == "yes" else 0, 2)):  # a cluster of dark nuclei
                draw.ellipse([cx + x, cy + y, cx + x + 5, cy + y + 5], fill=(40, 10, 60))
            img_id = f"{split}_{i:04d}"
            _save(os.path.join(root, "Path-VQA", "images", split, img_id + ".jpg"), image)
            for sent, answer, kind in (("What color is the stain in this image?", colour, "other"),
                                       ("Are clustered nuclei present?", nuclei, "yes/no")):
                qas.append({"img_id": img_id, "sent": sent, "label": {answer: 1}, "question_id": qid[split],
                            "answer_type": kind})
                qid[split] += 1
        _save(os.path.join(root, "Path-VQA", "qas", f"{split}_vqa.pkl"), pickle.dumps(qas, protocol=4))


def _demo_mimic(root, rng, counts):
    findings = [None] + [(s, z, sz) for s in ("left", "right") for z in ("upper", "lower")
                         for sz in ("small", "large")]
    table, subject = {}, 10000000
    for split, n in counts.items():
        table[split] = []
        for i in range(n):
            image, draw = _canvas(rng, 64, 64, (10, 10, 10))
            draw.ellipse([4, 4, 59, 63], fill=(170, 170, 170))  # the chest
            for x in (10, 36):  # the two (dark) lungs
                draw.ellipse([x, 10, x + 18, 54], fill=(45, 45, 45))
            report = "both lungs are clear. no focal opacity. no pleural effusion."
            if findings[i % len(findings)]:
                side, zone, size = findings[i % len(findings)]
                r, cx = (4 if size == "small" else 8), (19 if side == "left" else 45)
                cy = 22 if zone == "upper" else 42
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 240))
                report = (f"the {side} lung shows a {size} opacity in the {zone} zone. "
                          f"the {'right' if side == 'left' else 'left'} lung is clear. no pleural effusion.")
            subject += int(rng.integers(1, 999))
            rel = f"p{str(subject)[:2]}/p{subject}/s{subject + 40000000}/{int(rng.integers(16 ** 8)):08x}.jpg"
            _save(os.path.join(root, "MIMIC-CXR-JPG", "2.0.0", "files", rel), image)
            table[split].append({"id": f"{subject}", "image_path": [rel], "report": report})
    # the official layout: training reads annotation_small.json, the evaluation annotation.json
    _save(os.path.join(root, "MIMIC_caption", "annotation_small.json"), {"train": table["train"]})
    _save(os.path.join(root, "MIMIC_caption", "annotation.json"), {"test": table["test"]})


def _demo_medpix(root, rng, counts):
    """Caption rows plus one non-caption row and one with an empty cell, which the loader drops; the
    test split also has a caption that reads None, which the official loader keeps as text."""
    cases = [(m, f, s) for m in ("ct", "mri") for f in ("mass", "cyst") for s in ("left", "right")]
    number = 1000
    for split, n in counts.items():
        rows = [["name", "context", "type"]]
        for i in range(n):
            modality, finding, side = cases[i % len(cases)]
            ct = modality == "ct"
            image, draw = _canvas(rng, 64, 64, (0, 0, 0) if ct else (30, 30, 40), 6 if ct else 25)
            if ct:
                draw.ellipse([4, 4, 59, 59], fill=(110, 110, 110), outline=(250, 250, 250), width=3)
            else:
                draw.rectangle([6, 6, 57, 57], fill=(90, 90, 120))
            cx, mass = (20 if side == "left" else 44), finding == "mass"
            draw.ellipse([cx - 9, 23, cx + 9, 41], fill=(240,) * 3 if mass else (15,) * 3,
                         outline=None if mass else (230,) * 3, width=2)
            number += int(rng.integers(1, 99))
            name = f"MPX{number}_synpic{int(rng.integers(10000, 99999))}.png"
            _save(os.path.join(root, "MedPix", "MedPix", "images", name), image)
            rows.append([name, f"{modality} image shows a {finding} on the {side} side.", "caption"])
        rows += [[rows[1][0], "Case discussion, not a caption.", "case"], [rows[2][0], "", "caption"]]
        if split == "test":  # a scan with nothing drawn on it
            image, _ = _canvas(rng, 64, 64, (0, 0, 0), 6)
            name = f"MPX{number + 1}_synpic{int(rng.integers(10000, 99999))}.png"
            _save(os.path.join(root, "MedPix", "MedPix", "images", name), image)
            rows.append([name, "None", "caption"])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        _save(os.path.join(root, "MedPix", "data_csv", f"MedPix_single_{split}.csv"), buf.getvalue().encode())


def _demo_sa_med2d(root, rng, counts):
    case = 0
    for split, n in counts.items():
        for modality, base, amp in (("ct", (90, 90, 90), 8), ("mr", (35, 35, 35), 20)):
            for i in range(n):
                image, draw = _canvas(rng, 64, 64, base, amp)
                # shapes no Slake image has: a bright circle here would read as Slake's tumor
                _, (liver, spleen) = _two_objects(rng, draw, i + case, 64, 64,
                                                  [("diamond", (235,) * 3), ("ring", (235,) * 3)])
                image_id = f"{modality}_00--demo--case_{case:04d}--z_{int(rng.integers(100)):04d}"
                case += 1
                sub = os.path.join(root, "SA-Med2D-20M", "{}_small_" + split, modality, image_id)
                _save(sub.format("images") + ".png", image)
                _save(sub.format("regions") + ".json", [{"liver": liver}, {"spleen": spleen}])


def _derma(rng, label):
    image, draw = _canvas(rng, 64, 64, (225, 185, 160), 8)
    cx, cy = 32 + rng.integers(-6, 7, 2)
    if label == 4:  # melanoma: large, dark, irregular
        for _ in range(5):
            x, y, r = cx + rng.integers(-8, 9), cy + rng.integers(-8, 9), rng.integers(8, 13)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(60, 35, 25))
    elif label == 5:  # melanocytic nevus: small, round, brown
        draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], fill=(140, 90, 60))
    else:  # vascular lesion: a red ring
        draw.ellipse([cx - 13, cy - 13, cx + 13, cy + 13], outline=(200, 30, 40), width=4)
    return np.asarray(image)


def _organs(rng, label):
    image, draw = _canvas(rng, 64, 64, (30, 30, 30), 8)
    draw.ellipse([4, 8, 59, 55], fill=(80, 80, 80))  # the body
    dx, dy = rng.integers(-4, 5, 2)
    if label == 0:  # bladder: small bright square, low in the middle
        draw.rectangle([27 + dx, 40 + dy, 37 + dx, 50 + dy], fill=(230, 230, 230))
    elif label == 3:  # heart: bright disc, high in the middle
        draw.ellipse([22 + dx, 12 + dy, 42 + dx, 32 + dy], fill=(220, 220, 220))
    else:  # liver: large grey blob on the image's left
        draw.ellipse([8 + dx, 18 + dy, 34 + dx, 46 + dy], fill=(150, 150, 150))
    return np.asarray(image.convert("L"))


def _demo_medmnist(root, rng, counts):
    """MedMNIST+ npz layout at 64x64 (the loader reads any size); Derma RGB, OrganS grey."""
    for file, draw, labels in (("dermamnist_224.npz", _derma, (4, 5, 6)),
                               ("organsmnist_224.npz", _organs, (0, 3, 6))):
        arrays = {}
        for split, n in {**counts, "val": 6}.items():
            ys = [labels[i % len(labels)] for i in range(n)]
            arrays[f"{split}_images"] = np.stack([draw(rng, y) for y in ys])
            arrays[f"{split}_labels"] = np.array(ys, np.uint8)[:, None]
        _save(os.path.join(root, "MedMNIST", file), _npz_bytes(arrays))


def make_demo(root, seed: int = 0) -> None:
    """Write the miniature of every dataset under `root` (a data root for --data-root); the same
    seed writes the same bytes. Samples train/test: 400/100 for each REC and REG set, 600/150 for
    Slake-VQA, 480/100 for Path-VQA, 360/100 for MIMIC-CXR, 320/101 for MedPix, 300/102 for each
    MedMNIST set, 48/16 for MedQA and PubMedQA. Every image test set has at least 100 samples, so
    one sample moves a score by at most a point; the training sets are large enough that the
    drawn rule, not the training images, is what a model learns from them."""
    makers = [(_demo_medqa, 48, 16), (_demo_pubmedqa, 48, 16), (_demo_slake, 200, 50), (_demo_path_vqa, 240, 50),
              (_demo_mimic, 360, 100), (_demo_medpix, 320, 100), (_demo_sa_med2d, 100, 25), (_demo_medmnist, 300, 102)]
    for k, (maker, n_train, n_test) in enumerate(makers):
        maker(root, np.random.default_rng([seed, k]), {"train": n_train, "test": n_test})


def demo_text(root) -> list:
    """All text a demo model reads or writes (every template, the training split's instructions and
    answers), to train its sentencepiece vocabulary on."""
    lines = [t.replace("{}", " ").strip() for name in DATASETS for t in TEMPLATES[name][0] + [TEMPLATES[name][1]]]
    for ds in load_datasets(root, "train", train=False).values():
        for i in range(len(ds)):
            sample = ds.get(i)
            lines += [sample.instruction, sample.answer]
    return lines


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Uni-Med data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the miniature of every dataset under DIR")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_demo(args.dir, args.seed)
    for split in ("train", "test"):
        sizes = {n: len(d) for n, d in load_datasets(args.dir, split, train=False).items()}
        print(f"{split}: {sum(sizes.values())} samples  " + "  ".join(f"{n} {k}" for n, k in sizes.items()))
