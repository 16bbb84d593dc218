"""The twelve Uni-Med datasets, the training mixture and batching.

Uni-Med trains one model on six tasks (Table 1): question answering [qa], visual question answering
[vqa], report generation [caption], referring expression comprehension [refer] and generation
[identify], and image classification [cls]. Each dataset is read from the files exactly as they are
distributed (layouts in the spec, section 7) and every row becomes one plain `Sample`: an image (or
None), the templated instruction (it starts with the task identifier; the `<Img><ImageHere></Img>`
wrapper is added by model.py), the answer, and for the referring tasks the box.

Training draws one dataset per step by the paper's ratios and a batch of 4 from it (`Mixture`), with
a training template picked at random per sample; evaluation uses the fixed evaluation instruction.
Everything random comes from a seed, and the sampler's state goes into checkpoints.
The built-in demo's miniature of every dataset is written by workshop/demo.py.
"""
import os
import re
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lib import files
from vision import preprocess


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


class Batch(NamedTuple):  # a tuple: DataLoader(pin_memory=True) pins its images for an asynchronous copy
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


BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")  # "{<x1><y1><x2><y2>}"


def parse_box(text: str) -> Optional[tuple]:
    """A generated answer -> (x1, y1, x2, y2) on the 0-100 grid, or None (the official REC parse).

    `<unk>` and all spaces are removed; the text must then *start* with {<d><d><d><d>} (1-3 digits
    each); anything after it is ignored. Scaling to pixels (x * W / 100) is left to evaluation.
    """
    m = BOX.match(text.replace("<unk>", "").replace(" ", "").strip())
    return m and tuple(int(n) for n in m.groups())


# -------------------------------------------------------------------------------------------------
# Reading files (lib/files.py names the file when it cannot be read; here the dataset and row are named)

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


def load_datasets(root, split, names=None, train=None) -> dict:
    """Build the datasets of one split ("train" or "test") found under `root`.

    names: dataset ids (default: all; "medmnist" means both MedMNIST sets). An absent dataset is
    skipped with one warning line, unless it was named, then it is an error.
    train (default: split == "train"): return the training mixture's members, i.e. Derma and OrganS
    joined as "medmnist" like the official ConcatDataset. Templates are chosen by the `Mixture`.
    """
    train = split == "train" if train is None else train
    wanted = list(DATASETS) if names is None else [n for name in names
                                                   for n in (MEDMNIST if name == "medmnist" else [name])]
    table = default_paths(root, split)
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

    def draw(self) -> list[tuple]:
        """The next batch's (dataset, row, template) triples: all the sampler's randomness and state."""
        k = int(torch.multinomial(self.weights, 1, generator=self.generator))
        ds = self.datasets[self.names[k]]
        if self.pos[k] + self.batch_size > len(ds):  # drop_last, then a new epoch of this dataset
            self.epoch[k], self.pos[k] = self.epoch[k] + 1, 0
        idx = self._order(k)[self.pos[k]: self.pos[k] + self.batch_size].tolist()
        self.pos[k] += self.batch_size
        self.step += 1
        templates = torch.randint(len(ds.templates), (self.batch_size,), generator=self.generator)
        return [(self.names[k], i, int(t)) for i, t in zip(idx, templates)]

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
    """Samples of one task -> Batch: images preprocessed for the ViT and stacked."""
    tasks = {s.task for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"collate: a batch must hold one task, got {sorted(tasks)} "
                         f"(samples {[s.id for s in samples]})")
    # one task, so either every sample has an image or none does (QA)
    images = None if samples[0].image is None else torch.stack([preprocess(s.image, image_size) for s in samples])
    return Batch(images, [s.instruction for s in samples], [s.answer for s in samples], tasks.pop())
