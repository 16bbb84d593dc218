"""Evaluation: `python evaluate.py ckpt.pt` scores a checkpoint as the paper's Tables 3 and 6 do.

The official code evaluates with one script per task (eval_vqa.py, eval_ref.py, eval_identify.py,
eval_caption.py, eval_cls.py); this file does all of them in one pass, with the same settings:

  - the test split of every dataset found under --data-root, with the fixed evaluation template of
    each dataset (data.py, train=False) and the training-time image preprocessing;
  - greedy decoding, max_new_tokens 100, batches of 40 on a GPU (eval_configs), KV cache, left pad;
  - the prompt of training (one BOS), or with --official-prompt the official evaluation prompt (two
    BOS); the default is the official one for an official checkpoint and ours for ours;
  - the official post-processing of each answer: lower-cased, `<unk>` removed, stripped; a REC
    answer instead has `<unk>` and every space removed, without lower-casing (eval_ref.py), and must
    *start with* a `{<x1><y1><x2><y2>}` box (data.parse_box); an answer that does not is a miss
    (IoU 0), never an error;
  - the official metrics (metrics.py reproduces the libraries the official scripts call):
      VQA      sentence BLEU-1..4 and token F1 over all / open / closed questions, and the closed
               "accuracy" (normalised reference is a substring of the normalised prediction);
      REG      sentence BLEU-1..4, token F1, exact-match accuracy;
      REC      mean IoU and R@0.5 (IoU > 0.5) of the 0-100 grid box scaled to the original image,
               with the +1 pixel convention and its arithmetic for reversed boxes;
      RG       after dropping samples whose prediction or reference is empty: corpus BLEU-1..4
               (pycocoevalcap's), METEOR 1.5 (meteor.py, from the data files --meteor-data names;
               without them an exact+stem fallback, marked METEOR* and not comparable with the
               paper), then ROUGE-1/2/L (the `rouge` package, per sample, averaged) and token F1 on
               text normalised twice, as eval_caption.py does;
      CLS      exact-match accuracy of the normalised class name;
      QA       (not evaluated in the paper) exact-match accuracy and token F1.
    All figures are percentages, the paper's unit.

Outputs, in --out (default: `eval_<checkpoint stem>/` next to the checkpoint):
  predictions_<dataset>.jsonl   one line per sample: id, prompt, prediction, reference, scores
  results.json                  the metrics of every dataset (and the paper's, for real data)
The predictions files make a run resumable: samples already written are not generated again, each
batch is appended and flushed as soon as it is done, and a line cut short by a kill is dropped, so an
interrupted run loses at most the batch in flight.

Checkpoints: ours (train.py) or the official code's `checkpoint_N.pth`, both loaded by
`model.UniMed.from_checkpoint` (model.official_to_ours is the one place that knows the official names).

Asking (`--image PATH --ask "[task] question"`, or one question per line on standard input): the
question goes into its task's evaluation instruction and through the same preprocessing and decoding
(`answer_batch`); the answer is printed and pictures go to --out (default `ask_<checkpoint stem>/`):
the box of a [refer] answer or [identify] question on the image, and the routing map, i.e. each
expert's weight on every patch of the image.
"""
import argparse
import json
import os
import re
import sys
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import analysis
import data
import meteor
import metrics
from cmoe import token_of_patch
from files import image_error, read_log, require_file, write_json
from model import UniMed, build_prompt, checkpoint_data_root, read_checkpoint

MAX_NEW_TOKENS = 100  # eval_configs/uni_med_benchmark_evaluation.yaml
GPU_BATCH_SIZE = 40  # idem
CPU_BATCH_SIZE = 8

# -------------------------------------------------------------------------------------------------
# The paper's figures (Uni-Med, mean over runs; Tables 3 and 6) and how the tables are laid out

PAPER = {
    "slake_vqa": {"bleu1": 82.12, "f1": 83.07},
    "path_vqa": {"bleu1": 58.07, "f1": 58.74},
    "mimic_cxr": {"bleu1": 27.79, "bleu4": 6.46, "rouge1": 28.81, "rouge2": 9.62, "rougeL": 22.58,
                  "meteor": 10.59},
    "medpix": {"bleu1": 15.80, "bleu4": 2.47, "rouge1": 14.32, "rouge2": 2.68, "rougeL": 12.29,
                   "meteor": 5.92},
    "dermamnist": {"acc": 76.96},
    "organsmnist": {"acc": 78.07},
    "slake_rec": {"iou": 37.71, "r@0.5": 39.30},
    "sa_med2d_rec": {"iou": 21.60, "r@0.5": 14.42},
    "slake_reg": {"bleu1": 75.78, "f1": 77.35, "acc": 68.16},
    "sa_med2d_reg": {"bleu1": 61.47, "f1": 62.17, "acc": 57.69},
}

NAMES = {"slake_vqa": "Slake-VQA", "path_vqa": "Path-VQA", "mimic_cxr": "MIMIC-CXR", "medpix": "MPx-Single",
         "dermamnist": "DermaMNIST", "organsmnist": "OrganSMNIST", "slake_rec": "Slake-REC",
         "sa_med2d_rec": "SA-Med2D-REC", "slake_reg": "Slake-REG", "sa_med2d_reg": "SA-Med2D-REG",
         "medqa": "MedQA", "pubmedqa": "PubMedQA"}
BLEU1, F1, ACC = ("bleu1", "BLEU-1"), ("f1", "F1"), ("acc", "Acc")  # (metric, column label)
VQA, REC, REG, QA = [BLEU1, F1], [("iou", "IoU"), ("r@0.5", "R@0.5")], [BLEU1, F1, ACC], [ACC, F1]
RG = [BLEU1, ("bleu4", "BLEU-4"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
      ("meteor", "METEOR")]
TABLES = [  # (title, [(dataset, its columns)])
    ("Table 3: VQA and classification", [("slake_vqa", VQA), ("path_vqa", VQA), ("dermamnist", [ACC]),
                                         ("organsmnist", [ACC])]),
    ("Table 3: report generation", [("mimic_cxr", RG), ("medpix", RG)]),
    ("Table 6: referring expression comprehension (REC) and generation (REG)",
     [("slake_rec", REC), ("sa_med2d_rec", REC), ("slake_reg", REG), ("sa_med2d_reg", REG)]),
    ("Question answering (not evaluated in the paper)", [("medqa", QA), ("pubmedqa", QA)]),
]


# -------------------------------------------------------------------------------------------------
# Generation, resumable

def evaluate_dataset(model: UniMed, name: str, dataset, out_dir: str, batch_size: int,
                     limit: Optional[int], compile: bool = False, official_prompt: bool = False) -> list:
    """Generate the answers of one dataset (skipping those already written) and return all records."""
    path = os.path.join(out_dir, f"predictions_{name}.jsonl")
    records = read_log(path)  # a last line torn by a kill is cut off
    if any(r.get("official_prompt", False) != official_prompt for r in records):  # a resumed run must not mix
        flag = "--official-prompt" if not official_prompt else "--no-official-prompt"
        raise ValueError(f"{path} was generated with the other prompt: resume with {flag}, or delete it")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ids = [dataset.rows[i].id for i in range(n)]  # without opening the images
    done = {r["id"] for r in records}
    todo = {i for i in range(n) if ids[i] not in done}
    bar = tqdm(total=n, initial=n - len(todo), desc=name, unit="sample", dynamic_ncols=True)
    with open(path, "a") as f, bar:
        # Batches are cut from the full sample order, so a resumed run batches as an uninterrupted one
        for start in range(0, n, batch_size):
            indices = [i for i in range(start, min(start + batch_size, n)) if i in todo]
            if not indices:
                continue
            new = generate_batch(model, [dataset[i] for i in indices], compile, official_prompt)
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
            records += new
            bar.update(len(new))
    order = {sample_id: i for i, sample_id in enumerate(ids)}
    return sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])


@torch.no_grad()
def answer_batch(model: UniMed, samples: list, compile: bool = False,
                 official_prompt: bool = False) -> tuple[data.Batch, list]:
    """Samples of one task -> (their batch, images on the model's device; the raw answers): the
    preprocessing and decoding of evaluation, shared by the ask mode so that it answers alike
    (`compile`: the decode step compiled, the same tokens; `official_prompt`: two BOS)."""
    batch = data.collate(samples, image_size=model.image_size)
    if batch.images is not None:
        batch.images = batch.images.to(next(model.parameters()).device)
    return batch, model.generate(batch.images, batch.instructions, batch.task, max_new_tokens=MAX_NEW_TOKENS,
                                 compile=compile, official_prompt=official_prompt)


def generate_batch(model: UniMed, samples: list, compile: bool = False, official_prompt: bool = False) -> list:
    """One batch through the model, with the official decoding, post-processing and per-sample scores."""
    batch, outputs = answer_batch(model, samples, compile, official_prompt)
    records = []
    for s, out in zip(samples, outputs):
        r = {"id": s.id, "task": batch.task, "prompt": build_prompt(s.instruction, s.image is not None, train=False),
             "official_prompt": official_prompt, "output": out,
             "prediction": metrics.clean_prediction(out, batch.task), "reference": s.answer}
        if batch.task == "refer":
            r.update(box=list(s.box), image_size=list(s.image_size), pred_box=data.parse_box(r["prediction"]))
        if s.answer_type is not None:
            r["answer_type"] = s.answer_type
        r["scores"] = metrics.score_sample(batch.task, r)
        records.append(r)
    return records


# -------------------------------------------------------------------------------------------------
# Results

def format_tables(results: dict, paper: bool, starred: tuple = ()) -> str:
    """The paper's tables: a column per (dataset, metric); our row, and the paper's when comparable.
    The labels of the `starred` metrics get a star (a footnote says why)."""
    lines = []
    for title, groups in TABLES:
        groups = [(d, cols) for d, cols in groups if d in results]
        if not groups:
            continue
        cells = [[], [], [], []]  # dataset names, metric names, ours, the paper's
        for d, cols in groups:
            width = max(len(NAMES[d]), 8 * len(cols) - 1)
            got, want = results[d]["metrics"], PAPER.get(d, {})
            cells[0].append(NAMES[d].center(width))
            labels = [label + "*" if k in starred else label for k, label in cols]
            cells[1].append(" ".join(label.rjust(7) for label in labels).rjust(width))
            cells[2].append(" ".join(fmt(got.get(k)) for k, _ in cols).rjust(width))
            cells[3].append(" ".join(fmt(want.get(k)) for k, _ in cols).rjust(width))
        heads = ["", "", "Uni-Med (ours)", "Uni-Med (paper)"]
        table = [heads[i].ljust(16) + " | " + " | ".join(cells[i]) for i in range(4 if paper else 3)]
        lines += [title, *table, ""]
    return "\n".join(lines)


def fmt(value) -> str:
    return "   -   " if value is None else f"{value:7.2f}"


def which_prompt(ckpt: dict, official_prompt: Optional[bool]) -> bool:
    """--official-prompt as given; by default the official prompt for an official checkpoint only."""
    return ckpt.get("format") != "unimed-ckpt" if official_prompt is None else official_prompt


def prompt_note(official_prompt: bool) -> str:
    return "prompt: " + ("the official evaluation prompt, two BOS (--no-official-prompt for one)" if official_prompt
                         else "one BOS, as in training (--official-prompt for the official evaluation's two)")


def evaluate(ckpt_path: str, data_root: Optional[str] = None, names: Optional[list] = None,
             limit: Optional[int] = None, batch_size: Optional[int] = None, out: Optional[str] = None,
             llama: Optional[str] = None, vit: Optional[str] = None, device: Optional[str] = None,
             model: Optional[UniMed] = None, compile: bool = False,
             official_prompt: Optional[bool] = None) -> dict:
    """Score a checkpoint on the test splits; returns (and writes) results.json's content.

    official_prompt: the official evaluation prompt, with two BOS (UniMed.generate); by default on
    for an official checkpoint, to reproduce what the official scripts print, and off for ours."""
    ckpt = read_checkpoint(ckpt_path)  # read once: the data root is checked before the model loads
    official_prompt = which_prompt(ckpt, official_prompt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (GPU_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE)
    demo = ckpt.get("format") == "unimed-ckpt" and bool(ckpt["config"].get("demo"))
    data_root = checkpoint_data_root(ckpt, ckpt_path, data_root)
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                              f"eval_{os.path.splitext(os.path.basename(ckpt_path))[0]}")
    os.makedirs(out, exist_ok=True)

    datasets = data.load_datasets(data_root, "test", names=names, train=False)
    if not datasets:
        raise FileNotFoundError(f"no test split of any dataset under {data_root} (expected the "
                                f"official layout, e.g. {os.path.join(data_root, 'Slake-VQA', 'test.txt')})")
    meteor_data = meteor.meteor_data() if any(data.TASK_OF[n] == "caption" for n in datasets) else None
    if meteor_data:  # found now, so a wrong $METEOR_DATA fails before generation
        print(f"METEOR: {meteor_data.description}")
    model = model or UniMed.from_checkpoint(ckpt_path, llama, vit, device, ckpt=ckpt)

    print(prompt_note(official_prompt))
    results = {"checkpoint": os.path.abspath(ckpt_path), "step": ckpt.get("step", ckpt.get("epoch")),
               "data_root": os.path.abspath(data_root), "demo": demo, "limit": limit,
               "official_prompt": official_prompt, "datasets": {}}
    for name, dataset in datasets.items():
        records = evaluate_dataset(model, name, dataset, out, batch_size, limit, compile, official_prompt)
        task = data.TASK_OF[name]
        results["datasets"][name] = {"task": task, "n": len(records),
                                     "metrics": metrics.score_dataset(task, records)}
    if meteor_data:
        results["meteor"] = meteor_data.description
    if not demo:
        results["paper"] = {n: PAPER[n] for n in results["datasets"] if n in PAPER}
    write_json(os.path.join(out, "results.json"), results)
    fallback = meteor_data is not None and not meteor_data.folder
    print(format_tables(results["datasets"], paper=not demo, starred=("meteor",) if fallback else ()))
    if fallback:
        print("(METEOR*: METEOR 1.5 exact+stem fallback, no METEOR data found: not comparable with the paper)")
    if limit is not None:
        print(f"(first {limit} test samples of each dataset only: not comparable with the paper)")
    print(f"results: {os.path.join(out, 'results.json')}; predictions: {out}/predictions_*.jsonl")
    return results


# -------------------------------------------------------------------------------------------------
# Asking: your own image, your own questions, and where the experts looked
#
#   python evaluate.py ckpt.pt --image scan.png --ask "[vqa] which side is the lesion on?"
#   python evaluate.py ckpt.pt --image scan.png < questions.txt        # one question per line
#
# A question fills the slot of its task's evaluation instruction, and is answered by answer_batch
# like every evaluated sample, so the answer is the one evaluation would score for that instruction.

ASK_TEMPLATES = {  # the evaluation instruction of each task (data.TEMPLATES); the question fills {}
    "vqa": data.TEMPLATES["slake_vqa"][1],
    "refer": data.TEMPLATES["slake_rec"][1],
    "identify": data.TEMPLATES["slake_reg"][1],  # the question is a box {<x1><y1><x2><y2>}
    "caption": "[caption] {} ",  # the evaluation's are whole sentences, each followed by a space
    "cls": data.TEMPLATES["dermamnist"][1],
    "qa": data.TEMPLATES["medqa"][1],
}
DEFAULT_CAPTION = "Describe this input image."  # MedPix's evaluation instruction, for a bare [caption]
GRID_BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
BOX_COLOUR = (255, 40, 40)
DISPLAY = 1024  # longest side of the box picture; a larger image is reduced to it
PANEL = 224  # longest side of each panel of the routing map


def read_image(path: str) -> Image.Image:
    """The asked image as 8-bit RGB, or one line saying what is wrong with the file.

    Palette, grey, RGBA, CMYK... are converted as the datasets' images are (Image.convert). 16-bit and
    float images are first stretched from their minimum to their maximum: convert would clip every
    value above 255 to white. The size is left to preprocessing, which resizes to the ViT's input.
    """
    require_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large is fine: it is resized
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not inside the model
                if image.mode.startswith(("I", "F")):
                    pixels = np.asarray(image, dtype=np.float64)
                    lo, span = pixels.min(), max(pixels.max() - pixels.min(), 1e-12)
                    image = Image.fromarray(((pixels - lo) * (255 / span)).round().astype(np.uint8))
                return image.convert("RGB")
    except Exception as e:  # the same one-line errors as the datasets' images (files.image_error)
        raise image_error(path, e) from None


def read_question(line: str, task: str, has_image: bool) -> tuple[str, str, str, Optional[tuple]]:
    """A question, with an optional leading [task] tag that overrides `task` -> (task, question,
    the instruction evaluation builds from it (as TaskDataset.get does), the box an [identify]
    question asks about, on the 0-100 grid)."""
    tagged = re.match(r"\s*\[(\w+)\](.*)", line, re.S)
    if tagged:
        task, line = tagged.groups()
    if task not in ASK_TEMPLATES:
        raise ValueError(f"unknown task [{task}]; the tasks are {', '.join(ASK_TEMPLATES)}")
    if task != "qa" and not has_image:
        raise ValueError(f"a [{task}] question needs an image: give one with --image")
    question = data.process_text(line.strip()) or (DEFAULT_CAPTION if task == "caption" else "")
    if not question:
        raise ValueError(f"the [{task}] question is empty")
    box = None
    if task == "identify":
        m = GRID_BOX.fullmatch(question.replace(" ", ""))
        box = m and tuple(int(v) for v in m.groups())
        if not box or max(box) > 100 or box[0] >= box[2] or box[1] >= box[3]:
            raise ValueError(f"an [identify] question is a box {{<x1><y1><x2><y2>}} on the 0-100 grid of "
                             f"the image, x1 < x2 and y1 < y2, e.g. {{<10><20><55><70>}}; got {question!r}")
        question = "{{<{}><{}><{}><{}>}}".format(*box)  # as data.box_to_text writes it
    instruction = ASK_TEMPLATES[task].format(question)
    return task, question, data.process_text(instruction) if task == "qa" else instruction, box


@torch.no_grad()
def routing_map(model: UniMed, images: torch.Tensor, task: str) -> Optional[torch.Tensor]:
    """Each expert's weight on each ViT patch of one image: [grid, grid, N], None without experts.

    A resampled token is made from several patches (cmoe.token_of_patch), and its weights go to each
    of them. This runs the ViT and the connector a second time, which is cheap beside generation and
    leaves UniMed.generate exactly as evaluation calls it."""
    with model.autocast():
        weights = model.encode_images(images, task)[1]                      # [1, T, N]
    if weights is None:
        return None
    c, grid = model.connector.config, model.vit.config.grid
    owner = token_of_patch(c.resampler, c.rate, grid * grid).to(weights.device)
    return weights[0, owner].reshape(grid, grid, -1).float().cpu()        # [grid, grid, N]


def resized(image: Image.Image, longest: int) -> tuple[Image.Image, float]:
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BICUBIC), scale


def draw_box(image: Image.Image, box, scale: float = 1.0) -> Image.Image:
    """A copy of `image` with `box` (x1, y1, x2, y2 in pixels of the original, times `scale`) drawn
    inward from its edges. As the +1 pixel IoU counts them, x2 and y2 are pixels of the box."""
    out = image.copy()
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    x2, y2 = min(x2, out.width - 1), min(y2, out.height - 1)
    ImageDraw.Draw(out).rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=max(2, max(out.size) // 200))
    return out


def routing_figure(image: Image.Image, weights: torch.Tensor, title: str, grid_box=None) -> Image.Image:
    """The image, then one translucent panel per expert: its weight on every patch, on one colour
    scale from 0 to the largest weight, with its mean weight over the image in the title."""
    panel, scale = resized(image, PANEL)
    shown = panel if grid_box is None else draw_box(panel, metrics.grid_to_pixels(grid_box, image.size), scale)
    grey = panel.convert("L").convert("RGB")
    top = max(float(weights.max()), 1e-6)
    panels = [analysis.stack([shown], horizontal=False, title="image")]
    for k in range(weights.shape[-1]):
        heat = Image.new("RGB", weights.shape[1::-1])
        heat.putdata([analysis.colour(analysis.VIRIDIS, w / top) for w in weights[..., k].flatten().tolist()])
        heat = heat.resize(panel.size, Image.NEAREST)  # the patch grid covers the whole image
        panels.append(analysis.stack([Image.blend(grey, heat, 0.6)], horizontal=False,
                                     title=f"E{k + 1}: mean {float(weights[..., k].mean()):.2f}"))
    bar = Image.new("RGB", (90, panel.height + 56), analysis.WHITE)  # room for the ticks' text
    analysis.colour_bar(bar, 6, 40, panel.height - 1, analysis.VIRIDIS, 0.0, top, "routing weight")
    return analysis.stack(panels + [bar], horizontal=True, title=title if len(title) <= 120 else title[:117] + "...")


def ask(model: UniMed, image: Optional[Image.Image], line: str, task: str, out_dir: str, name: str,
        compile: bool = False, official_prompt: bool = False) -> dict:
    """Answer one question about `image` as evaluation would, and write its pictures to out_dir as
    name_box.png ([refer]: the predicted box; [identify]: the asked one) and name_routing.png."""
    task, question, instruction, box = read_question(line, task, image is not None)
    image = None if task == "qa" else image
    sample = data.Sample(name, "ask", task, image, instruction, "", image_size=image and image.size)
    batch, [output] = answer_batch(model, [sample], compile, official_prompt)
    r = {"task": task, "prompt": build_prompt(instruction, image is not None, train=False), "output": output,
         "prediction": metrics.clean_prediction(output, task), "pictures": []}
    if task == "refer":
        box = r["pred_box"] = data.parse_box(r["prediction"])  # None: not a box, so nothing is drawn
    if image is None:
        return r
    pictures = {}
    if box is not None:  # on the image reduced to DISPLAY pixels if larger, scaled as evaluation scales a box
        shown, scale = resized(image, DISPLAY) if max(image.size) > DISPLAY else (image, 1.0)
        pictures["box"] = draw_box(shown, metrics.grid_to_pixels(box, image.size), scale)
    weights = routing_map(model, batch.images, task)
    if weights is not None:
        short = question if len(question) <= 60 else question[:57] + "..."
        pictures["routing"] = routing_figure(image, weights, f"[{task}] {short} -> {r['prediction']}", box)
    os.makedirs(out_dir, exist_ok=True)
    for kind, picture in pictures.items():
        r["pictures"].append(os.path.join(out_dir, f"{name}_{kind}.png"))
        analysis.save_png(picture, r["pictures"][-1])
    return r


def unused_name(out_dir: str, stem: str) -> str:
    """stem_N for the first N whose pictures are not in out_dir yet: no earlier answer is overwritten."""
    files, n = os.listdir(out_dir) if os.path.isdir(out_dir) else [], 1
    while any(f.startswith(f"{stem}_{n}_") for f in files):
        n += 1
    return f"{stem}_{n}"


def ask_main(args) -> int:
    """--image / --ask / --task: load the model once, then answer --ask, or every line of standard
    input; returns the number of lines that were not answered."""
    path = args.checkpoint[0]
    image = read_image(args.image) if args.image else None  # a bad file fails before the model loads
    if args.ask is not None:
        read_question(args.ask, args.task, image is not None)  # and so does a malformed question
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)),
                                   f"ask_{os.path.splitext(os.path.basename(path))[0]}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = read_checkpoint(path)
    official_prompt = which_prompt(ckpt, args.official_prompt)
    model = UniMed.from_checkpoint(path, args.llama, args.vit, device, ckpt=ckpt)
    print(prompt_note(official_prompt), file=sys.stderr)
    stem = os.path.splitext(os.path.basename(args.image))[0] if args.image else "text"
    if args.ask is None and sys.stdin.isatty():
        print("one question per line; end with Ctrl-D", file=sys.stderr)
    failed = 0
    for n, line in enumerate([args.ask] if args.ask is not None else sys.stdin, 1):
        if not line.strip():
            continue
        try:
            r = ask(model, image, line, args.task, out, unused_name(out, stem), args.compile, official_prompt)
        except ValueError as e:  # one bad line of standard input does not end the session
            if args.ask is not None:
                raise
            print(f"error: line {n}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(r["prediction"], flush=True)
        if r["pictures"]:
            print(f"  pictures: {', '.join(r['pictures'])}", file=sys.stderr)
    return failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="+", help="ckpt.pt from train.py, or an official checkpoint_N.pth "
                   "(with --analysis, two checkpoints are drawn side by side, as in Figure 4)")
    p.add_argument("--data-root", help="dataset root (default: the one recorded in the checkpoint)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every one found)")
    p.add_argument("--limit", type=int, help="evaluate only the first N test samples of each dataset")
    p.add_argument("--batch-size", type=int,
                   help=f"generation batch (default {GPU_BATCH_SIZE} on GPU as official, {CPU_BATCH_SIZE} on CPU)")
    p.add_argument("--out", help="output directory (default: eval_<checkpoint stem>/ beside the checkpoint; "
                   "ask_<checkpoint stem>/ for the pictures of --image/--ask)")
    p.add_argument("--llama", help="HF LLaMA-2 directory (default: the one recorded in the checkpoint)")
    p.add_argument("--vit", help="EVA ViT-g .safetensors (default: the one recorded in the checkpoint)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--meteor-data", metavar="DIR", help="METEOR 1.5's data: the folder of meteor-1.5.jar and "
                   "data/paraphrase-en.gz (default: $METEOR_DATA, else the installed pycocoevalcap's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU): same answers, faster decoding")
    p.add_argument("--official-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt with two BOS as the official eval scripts do, or one as in training "
                        "(default: two for an official checkpoint_N.pth, one for ours)")
    p.add_argument("--analysis", metavar="OUT_DIR",
                   help="run the tug-of-war analysis (analysis.py: Figures 2, 4, 5) instead of the evaluation")
    p.add_argument("--batches", type=int, default=100,
                   help="with --analysis: sampled training batches per dataset (paper 100)")
    ask = p.add_argument_group("asking (instead of the evaluation): answers on standard output, pictures in --out")
    ask.add_argument("--image", help="the image to ask about")
    ask.add_argument("--ask", metavar="QUESTION",
                     help="the question; a leading [task] tag overrides --task. Without --ask, one question "
                          "per line is read from standard input, the model loaded once")
    ask.add_argument("--task", choices=list(ASK_TEMPLATES),
                     help="the task of untagged questions (default vqa); [identify] asks about a box "
                          "{<x1><y1><x2><y2>} on the 0-100 grid of the image")
    args = p.parse_args(argv)
    if args.image is not None or args.ask is not None or args.task is not None:
        for flag in ("data_root", "datasets", "limit", "batch_size", "meteor_data", "analysis"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} is for evaluation, not for asking (--image/--ask/--task)")
        if len(args.checkpoint) > 1:
            p.error("ask one checkpoint at a time")
        args.task = args.task or "vqa"
        try:
            failed = ask_main(args)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        if failed:
            sys.exit(f"error: {failed} of the questions could not be answered (see above)")
        return
    if args.analysis:
        forwarded = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                     for flag in ("data_root", "datasets", "llama", "vit", "device")
                     if getattr(args, flag) is not None]
        return analysis.main(args.checkpoint + ["--out", args.analysis, f"--batches={args.batches}"] + forwarded)
    if len(args.checkpoint) > 1:
        p.error("evaluate one checkpoint at a time (two are for --analysis)")
    names = args.datasets.split(",") if args.datasets else None
    if args.meteor_data:
        os.environ["METEOR_DATA"] = args.meteor_data  # where meteor.meteor_data() looks first
    try:
        evaluate(args.checkpoint[0], args.data_root, names, args.limit, args.batch_size, args.out,
                 args.llama, args.vit, args.device, compile=args.compile, official_prompt=args.official_prompt)
    except (ValueError, OSError) as e:  # bad input: the file, key or row at fault is named in e
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
