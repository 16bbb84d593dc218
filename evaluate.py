"""Evaluation: `python evaluate.py ckpt.pt` scores a checkpoint as the paper's Tables 3 and 6 do.

The official code has one script per task (eval_vqa.py, eval_ref.py, eval_identify.py,
eval_caption.py, eval_cls.py); this file runs them all in one pass, with their settings: the test
split of every dataset found, its fixed evaluation instruction, greedy decoding of at most 100 new
tokens in batches of 40 on a GPU, the official cleaning of each answer (metrics.clean_prediction)
and the official metrics (metrics.score_dataset), in percent:

    VQA   BLEU-1 and token F1 (Table 3), also over open and closed questions
    REC   mean IoU and R@0.5 of the 0-100 grid box scaled to the image (Table 6)
    REG   BLEU-1, token F1, exact-match accuracy (Table 6)
    RG    corpus BLEU-1..4, METEOR 1.5, ROUGE-1/2/L (Table 3)
    CLS   accuracy (Table 3);   QA   accuracy and F1 (not in the paper)

Checkpoints are ours (train.py) or the official runner's `checkpoint_N.pth`. The prompt has one BOS
as in training, or two as the official scripts wrote it (--official-prompt, the default for an
official checkpoint). Each dataset's answers are appended to `predictions_<dataset>.jsonl` batch by
batch, so an interrupted run resumes where it stopped; the scores go to `results.json`.
"""
import argparse
import json
import os
import sys
from typing import Optional

import torch
from tqdm import tqdm

import data
import metrics
from lib import meteor
from lib.checkpoint import checkpoint_data_root, is_ours, read_checkpoint
from lib.files import read_log, write_json
from model import UniMed, build_prompt

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
    preprocessing and decoding of evaluation (`compile`: the decode step compiled, the same tokens;
    `official_prompt`: two BOS)."""
    batch = data.collate(samples, image_size=model.image_size)
    if batch.images is not None:
        batch = batch._replace(images=batch.images.to(next(model.parameters()).device))
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
    return not is_ours(ckpt) if official_prompt is None else official_prompt


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
    demo = is_ours(ckpt) and bool(ckpt["config"].get("demo"))
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


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that load a checkpoint and decode with it (also workshop/ask.py's)."""
    p.add_argument("--llama", help="HF LLaMA-2 directory (default: the one recorded in the checkpoint)")
    p.add_argument("--vit", help="EVA ViT-g .safetensors (default: the one recorded in the checkpoint)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU): same answers, faster decoding")
    p.add_argument("--official-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt with two BOS as the official eval scripts do, or one as in training "
                        "(default: two for an official checkpoint_N.pth, one for ours)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="ckpt.pt from train.py, or an official checkpoint_N.pth")
    p.add_argument("--data-root", help="dataset root (default: the one recorded in the checkpoint)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every one found)")
    p.add_argument("--limit", type=int, help="evaluate only the first N test samples of each dataset")
    p.add_argument("--batch-size", type=int,
                   help=f"generation batch (default {GPU_BATCH_SIZE} on GPU as official, {CPU_BATCH_SIZE} on CPU)")
    p.add_argument("--out", help="output directory (default: eval_<checkpoint stem>/ beside the checkpoint)")
    p.add_argument("--meteor-data", metavar="DIR", help="METEOR 1.5's data: the folder of meteor-1.5.jar and "
                   "data/paraphrase-en.gz (default: $METEOR_DATA, else the installed pycocoevalcap's)")
    add_model_flags(p)
    args = p.parse_args(argv)
    if args.meteor_data:
        os.environ["METEOR_DATA"] = args.meteor_data  # where meteor.meteor_data() looks first
    try:
        evaluate(args.checkpoint, args.data_root, args.datasets and args.datasets.split(","), args.limit,
                 args.batch_size, args.out, args.llama, args.vit, args.device, compile=args.compile,
                 official_prompt=args.official_prompt)
    except (ValueError, OSError) as e:  # bad input: the file, key or row at fault is named in e
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
