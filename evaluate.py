"""Evaluation: `python evaluate.py ckpt.pt` scores a checkpoint as the paper's Tables 3 and 6 do.

The official code evaluates with one script per task (eval_vqa.py, eval_ref.py, eval_identify.py,
eval_caption.py, eval_cls.py); this file does all of them in one pass, with the same settings:

  - the test split of every dataset found under --data-root, with the fixed evaluation template of
    each dataset (data.py, train=False) and the training-time image preprocessing;
  - greedy decoding, max_new_tokens 100, batches of 40 on a GPU (eval_configs), KV cache, left pad;
  - the official post-processing of each answer: lower-cased, `<unk>` removed, stripped; a REC
    answer then has every space removed and must *start with* a `{<x1><y1><x2><y2>}` box
    (data.parse_box); an answer that does not is a miss (IoU 0), never an error;
  - the official metrics (metrics.py reproduces the libraries the official scripts call):
      VQA      sentence BLEU-1..4 and token F1 over all / open / closed questions, and the closed
               "accuracy" (normalised reference is a substring of the normalised prediction);
      REG      sentence BLEU-1..4, token F1, exact-match accuracy;
      REC      mean IoU and R@0.5 (IoU > 0.5) of the 0-100 grid box scaled to the original image,
               with the +1 pixel convention;
      RG       after dropping samples whose prediction or reference is empty: corpus BLEU-1..4
               (pycocoevalcap's), ROUGE-1/2/L (the `rouge` package, per sample on normalised text,
               averaged), METEOR;
      CLS      exact-match accuracy of the normalised class name;
      QA       (not evaluated in the paper) exact-match accuracy and token F1.
    All figures are percentages, the paper's unit.

Outputs, in --out (default: `eval_<checkpoint stem>/` next to the checkpoint):
  predictions_<dataset>.jsonl   one line per sample: id, prompt, prediction, reference, scores
  results.json                  the metrics of every dataset (and the paper's, for real data)
The predictions files make a run resumable: samples already written are not generated again, each
batch is appended and flushed as soon as it is done, and a line cut short by a kill is dropped, so an
interrupted run loses at most the batch in flight.

Checkpoints: ours (train.py) or the official code's `checkpoint_N.pth`, whose trainable tensors are
renamed to ours by `official_to_ours` (the one place that knows the official names).
"""
import argparse
import json
import os
import re
import sys
from typing import Optional

import torch
from tqdm import tqdm

import data
import metrics
from model import UniMed, UniMedConfig, build_prompt, write_json
from vision import EVAConfig

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
RG = [("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
      ("rougeL", "ROUGE-L"), ("meteor", "METEOR")]
TABLES = [  # (title, [(dataset, [(metric, column label)])])
    ("Table 3: VQA and classification", [
        ("slake_vqa", [("bleu1", "BLEU-1"), ("f1", "F1")]),
        ("path_vqa", [("bleu1", "BLEU-1"), ("f1", "F1")]),
        ("dermamnist", [("acc", "Acc")]),
        ("organsmnist", [("acc", "Acc")])]),
    ("Table 3: report generation", [("mimic_cxr", RG), ("medpix", RG)]),
    ("Table 6: referring expression comprehension (REC) and generation (REG)", [
        ("slake_rec", [("iou", "IoU"), ("r@0.5", "R@0.5")]),
        ("sa_med2d_rec", [("iou", "IoU"), ("r@0.5", "R@0.5")]),
        ("slake_reg", [("bleu1", "BLEU-1"), ("f1", "F1"), ("acc", "Acc")]),
        ("sa_med2d_reg", [("bleu1", "BLEU-1"), ("f1", "F1"), ("acc", "Acc")])]),
    ("Question answering (not evaluated in the paper)", [
        ("medqa", [("acc", "Acc"), ("f1", "F1")]),
        ("pubmedqa", [("acc", "Acc"), ("f1", "F1")])]),
]


# -------------------------------------------------------------------------------------------------
# Checkpoints: ours, or the official code's

def read_checkpoint(path: str) -> dict:
    """Load a checkpoint without unpickling code, with an error that says what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle of arbitrary objects
        raise ValueError(f"{path}: cannot be read as a checkpoint with torch.load(weights_only=True) "
                         f"(truncated, corrupted or not a checkpoint?): {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a Uni-Med checkpoint: expected a dict with a 'model' entry "
                         f"(trainable weights), got {type(ckpt).__name__}"
                         + (f" with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, dict) else ""))
    if ckpt.get("format") == "unimed-ckpt":
        missing = [k for k in ("config", "model") if k not in ckpt]
        missing += [f"config.{k}" for k in ("unimed", "vit", "llama_dir", "vit_path", "data_root")
                    if k not in ckpt.get("config", {})]
        if missing:
            raise ValueError(f"{path}: Uni-Med checkpoint without {', '.join(missing)}")
        return ckpt
    if "format" in ckpt:
        raise ValueError(f"{path}: unknown checkpoint format {ckpt['format']!r} (expected 'unimed-ckpt')")
    if not any(k.startswith(("llm_proj.", "task_tokens.", "llm_model.")) for k in ckpt["model"]):
        raise ValueError(f"{path}: not a Uni-Med checkpoint: no 'format' entry (ours) and no "
                         f"official tensors (llm_proj.*, task_tokens.*, llm_model.*) in 'model'")
    return ckpt  # the official layout


# Official names (uni_med/models/uni_med.py; peft wraps the LLaMA as llm_model.base_model.model):
#   task_tokens.<task>                                       [1, 1, task_token_c]
#   llm_proj.<k>.{0,2}.{weight,bias}                         expert k of moe_mlp (0 = Linear in,
#                                                            1 = GELU, 2 = Linear out)
#   llm_proj.{weight,bias} / llm_proj.{0,2}.*                linear / mlp2x_gelu connector
#   router.fc1.*, router.fc2.*                               the router MLP
#   llm_model.base_model.model.model.layers.<i>.{self_attn,mlp}.<proj>.lora_{A,B}.default.weight
OFFICIAL_LORA = re.compile(r"llm_model\.base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                           r"(\w+_proj)\.lora_([AB])\.default\.weight")
OFFICIAL_EXPERT = re.compile(r"llm_proj\.(\d+)\.([02])\.(weight|bias)")
OFFICIAL_FROZEN = re.compile(r".*rotary_emb\.inv_freq")  # a buffer older transformers saved; recomputed


def official_config(ckpt: dict, path: str) -> dict:
    """Our UniMedConfig (as a dict) from the official run config saved in the checkpoint."""
    model = (ckpt.get("config") or {}).get("model")
    if not model:
        raise ValueError(f"{path}: official checkpoint without its run config ('config' -> 'model'); "
                         f"the router type and connector cannot be read from the tensors alone")
    projector = model.get("projector_type")
    moe = bool(model.get("has_moe")) and projector in ("moe_mlp", "moe_linear")
    if projector not in ("linear", "mlp2x_gelu", "moe_mlp") or (projector == "moe_mlp") != moe:
        raise ValueError(f"{path}: official projector_type {projector!r} (has_moe "
                         f"{model.get('has_moe')}) has no equivalent here; supported: linear, "
                         f"mlp2x_gelu, moe_mlp with has_moe")
    if moe and model.get("num_task_tokens", 10) != 1:
        raise ValueError(f"{path}: official num_task_tokens {model.get('num_task_tokens')} is not "
                         f"supported (the official encode_img only works with 1)")
    if model.get("lora_target_modules") not in (["all"], ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]):
        raise ValueError(f"{path}: official lora_target_modules {model.get('lora_target_modules')} "
                         f"is not supported (only 'all')")
    connector = {
        "resampler": model.get("resample_method", "projection"),
        "rate": model.get("resample_rate", 4),
        "connector": {"linear": "linear", "mlp2x_gelu": "mlp", "moe_mlp": "moe"}[projector],
        "experts": model.get("num_experts", 3) if moe else 1,
        "router": model.get("router_type", "soft"),
        "router_input": {"router_task_token": "token_task", "router_token": "token",
                         "router_task": "task"}[model.get("router_method", "router_task_token")],
        "top_k": model.get("sparse_topk", 2),
    }
    return {"connector": connector, "lora_r": model.get("lora_r", 64),
            "lora_alpha": model.get("lora_alpha", 16), "lora_dropout": model.get("lora_dropout", 0.05)}


def official_to_ours(state: dict, config: UniMedConfig, path: str = "checkpoint") -> dict:
    """Rename the official trainable tensors to ours, dropping those the official model never uses.

    The official code builds a router whenever it builds MoE experts, since its test
    `router_type == 'soft' or 'sparse'` is always true, but a hard or constant router never calls it
    (spec section 10); it also keeps task tokens that nothing reads (linear and MLP connectors, or a
    router that sees the token only). We build neither, so such tensors are dropped, and we say so.
    Our router reads [task token, token] in the official order, so its weights need no permutation.
    """
    c = config.connector
    ours, dropped = {}, []
    for key, t in state.items():
        m_lora, m_expert = OFFICIAL_LORA.fullmatch(key), OFFICIAL_EXPERT.fullmatch(key)
        if OFFICIAL_FROZEN.fullmatch(key):
            dropped.append(key)
        elif m_lora:
            layer, block, proj, ab = m_lora.groups()
            block = "attn" if block == "self_attn" else "mlp"
            ours[f"llama.layers.{layer}.{block}.{proj}.lora_{ab}.weight"] = t
        elif key.startswith("task_tokens."):
            if c.uses_task_tokens:
                ours[f"connector.{key}"] = t  # [1, 1, task_token_c]
            else:
                dropped.append(key)
        elif key.startswith("router."):
            if c.uses_router_network:
                ours[f"connector.{key}"] = t  # router.fc1 / router.fc2, same names
            else:
                dropped.append(key)
        elif c.connector == "moe" and m_expert:
            k, layer, kind = m_expert.groups()
            ours[f"connector.experts.{k}.{'fc1' if layer == '0' else 'fc2'}.{kind}"] = t
        elif c.connector == "mlp" and (m := re.fullmatch(r"llm_proj\.([02])\.(weight|bias)", key)):
            ours[f"connector.proj.{'fc1' if m.group(1) == '0' else 'fc2'}.{m.group(2)}"] = t
        elif c.connector == "linear" and key in ("llm_proj.weight", "llm_proj.bias"):
            ours[f"connector.proj.{key.split('.')[1]}"] = t
        else:
            raise ValueError(f"{path}: official tensor '{key}' {list(t.shape)} has no counterpart in "
                             f"a model with connector {c.connector!r}, router {c.router!r}")
    if dropped:
        kinds = sorted({k.split(".")[0] for k in dropped})
        print(f"{path}: dropped {len(dropped)} official tensors the official model never uses "
              f"({', '.join(kinds)}; e.g. '{dropped[0]}')")
    return ours


# -------------------------------------------------------------------------------------------------
# The model

def locate(recorded: str, ckpt_path: str) -> str:
    """A path recorded in a checkpoint: as written, else relative to the checkpoint's directory
    (the demo records paths relative to where train.py ran, which is usually beside ckpt.pt)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), recorded)
    return recorded if os.path.exists(recorded) or os.path.isabs(recorded) or not os.path.exists(beside) else beside


def build_model(ckpt: dict, path: str, llama_dir: Optional[str], vit_path: Optional[str],
                device: str, official_vit: Optional[EVAConfig] = None) -> UniMed:
    """UniMed on the base weights the checkpoint was trained on, with the checkpoint's trainable weights.

    An official checkpoint always used EVA ViT-G (the official code accepts no other); its image
    size comes from the run config. `official_vit` replaces ViT-G (tests use a tiny one).
    """
    official = ckpt.get("format") != "unimed-ckpt"
    if official:
        cfg = UniMedConfig.from_dict(official_config(ckpt, path))
        vit_cfg = official_vit or EVAConfig(img_size=ckpt["config"]["model"].get("image_size", 224))
        llama_dir = llama_dir or ckpt["config"]["model"].get("llm_model_path") or None
        if not llama_dir or not vit_path:
            raise ValueError(f"{path} is an official checkpoint: name its base weights with --llama "
                             f"(HF Llama-2-7b-chat directory) and --vit (EVA ViT-g .safetensors)")
    else:
        cfg = UniMedConfig.from_dict(ckpt["config"]["unimed"])
        vit_cfg = EVAConfig(**ckpt["config"]["vit"])
        llama_dir = llama_dir or locate(ckpt["config"]["llama_dir"], path)
        vit_path = vit_path or locate(ckpt["config"]["vit_path"], path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = UniMed.from_pretrained(llama_dir, vit_path, cfg, vit_config=vit_cfg, dtype=dtype, device=device)
    state = official_to_ours(ckpt["model"], cfg, path) if official else ckpt["model"]
    model.load_trainable_state_dict(state, source=f"{path} (on the base weights {llama_dir} and {vit_path})")
    return model.eval()


# -------------------------------------------------------------------------------------------------
# Scores (the official eval_*.py scripts, through metrics.py)

def is_closed(answer_type) -> bool:
    # Slake labels questions OPEN / CLOSED; data.py already maps Path-VQA's "yes/no" to CLOSED, as eval_vqa.py does
    return str(answer_type).upper() == "CLOSED"


def sample_scores(task: str, r: dict) -> dict:
    """Per-sample scores written next to each prediction, for reading (the tables use dataset_scores)."""
    refs, preds = [[r["reference"]]], [r["prediction"]]
    if task == "refer":
        iou = metrics.rec_iou(r["pred_box"], r["box"], r["image_size"])
        return {"iou": iou, "hit": iou > 0.5}
    if task == "caption":
        if not r["prediction"] or not r["reference"]:
            return {"dropped": True}  # the RG metrics skip empty pairs, as eval_caption.py does
        return {**metrics.rouge(refs, preds), "meteor": metrics.meteor(refs, preds)}
    if task == "cls":
        return {"acc": metrics.exact_match(refs, preds)}
    scores = {"bleu1": metrics.sentence_bleu(refs, preds)["bleu1"], "f1": metrics.token_f1(refs, preds)["f1"]}
    if task == "vqa":
        scores["contains"] = metrics.closed_accuracy(refs, preds)
    else:
        scores["acc"] = metrics.exact_match(refs, preds)
    return scores


def percent(scores: dict) -> dict:
    return {k: 100.0 * v for k, v in scores.items()}


def text_scores(records: list) -> dict:
    """Sentence BLEU-1..4 and token F1, averaged over samples (VQA, REG, QA); None when empty."""
    if not records:
        return dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "f1"))
    refs, preds = [[r["reference"]] for r in records], [r["prediction"] for r in records]
    return percent({**metrics.sentence_bleu(refs, preds), "f1": metrics.token_f1(refs, preds)["f1"]})


def dataset_scores(task: str, records: list) -> dict:
    """The metrics of one dataset, in percent, as the official script of its task computes them."""
    if not records:
        return {}
    refs, preds = [[r["reference"]] for r in records], [r["prediction"] for r in records]
    if task == "vqa":  # eval_vqa.py: all, open and closed subsets; "accuracy" on closed only
        closed = [r for r in records if is_closed(r.get("answer_type"))]
        opened = [r for r in records if not is_closed(r.get("answer_type"))]
        out = text_scores(records)
        out.update({f"open_{k}": v for k, v in text_scores(opened).items()})
        out.update({f"closed_{k}": v for k, v in text_scores(closed).items()})
        out["closed_acc"] = 100.0 * metrics.closed_accuracy(
            [[r["reference"]] for r in closed], [r["prediction"] for r in closed]) if closed else None
        return out
    if task in ("identify", "qa"):  # eval_identify.py (QA: the same, not in the paper)
        return {**text_scores(records), "acc": 100.0 * metrics.exact_match(refs, preds)}
    if task == "cls":  # eval_cls.py
        return {"acc": 100.0 * metrics.exact_match(refs, preds)}
    if task == "refer":  # eval_ref.py: an unparsable answer has IoU 0
        ious = [metrics.rec_iou(r["pred_box"], r["box"], r["image_size"]) for r in records]
        return {"iou": 100.0 * sum(ious) / len(ious), "r@0.5": 100.0 * metrics.recall_at(ious)}
    if task == "caption":  # eval_caption.py: empty predictions or references are dropped first
        kept = [r for r in records if r["prediction"] and r["reference"]]
        refs, preds = [[r["reference"]] for r in kept], [r["prediction"] for r in kept]
        if not kept:
            return {**dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL",
                                     "meteor")), "scored": 0}
        return {**percent(metrics.corpus_bleu(refs, preds)), **percent(metrics.rouge(refs, preds)),
                "meteor": 100.0 * metrics.meteor(refs, preds), "scored": len(kept)}
    raise ValueError(f"no metrics for task {task!r}")


# -------------------------------------------------------------------------------------------------
# Generation, resumable

def read_predictions(path: str) -> list:
    """The complete lines of a predictions file; a last line cut short by a kill is removed from it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    records, good_end = [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        end = good_end + len(line) + 1
        if not line.strip():
            good_end = min(end, len(raw))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if end <= len(raw):  # a complete line that is not JSON: not ours to throw away
                raise ValueError(f"{path}:{lineno}: not a JSON line; delete the file to start over")
            break  # the torn last line of an interrupted run
        if end > len(raw):  # valid JSON but no newline yet: still the torn last line
            break
        records.append(record)
        good_end = end
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def evaluate_dataset(model: UniMed, name: str, dataset, out_dir: str, batch_size: int,
                     limit: Optional[int]) -> list:
    """Generate the answers of one dataset (skipping those already written) and return all records."""
    path = os.path.join(out_dir, f"predictions_{name}.jsonl")
    records = read_predictions(path)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ids = [dataset.rows[i].id for i in range(n)]  # without opening the images
    done = {r["id"] for r in records}
    todo = {i for i in range(n) if ids[i] not in done}
    bar = tqdm(total=n, initial=n - len(todo), desc=name, unit="sample", dynamic_ncols=True)
    with open(path, "a") as f:
        # Batches are cut from the full sample order, so a resumed run batches as an uninterrupted one
        for start in range(0, n, batch_size):
            indices = [i for i in range(start, min(start + batch_size, n)) if i in todo]
            if not indices:
                continue
            samples = [dataset[i] for i in indices]
            new = generate_batch(model, samples)
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
            records += new
            bar.update(len(new))
    bar.close()
    order = {sample_id: i for i, sample_id in enumerate(ids)}
    return sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])


@torch.no_grad()
def generate_batch(model: UniMed, samples: list) -> list:
    """One batch through the model, with the official decoding, post-processing and per-sample scores."""
    batch = data.collate(samples, image_size=model.image_size)
    device = next(model.parameters()).device
    images = None if batch.images is None else batch.images.to(device)
    outputs = model.generate(images, batch.instructions, batch.task, max_new_tokens=MAX_NEW_TOKENS)
    records = []
    for s, out in zip(samples, outputs):
        # The official cleaning (lower-case, no <unk>, strip); REC then drops spaces and needs the
        # answer to start with the box (data.parse_box), so lower-casing does not change its score.
        r = {"id": s.id, "task": batch.task, "prompt": build_prompt(s.instruction, s.image is not None, train=False),
             "output": out, "prediction": metrics.clean_prediction(out), "reference": s.answer}
        if batch.task == "refer":
            r.update(box=list(s.box), image_size=list(s.image_size), pred_box=data.parse_box(r["prediction"]))
        if s.answer_type is not None:
            r["answer_type"] = s.answer_type
        r["scores"] = sample_scores(batch.task, r)
        records.append(r)
    return records


# -------------------------------------------------------------------------------------------------
# Results

def format_tables(results: dict, paper: bool) -> str:
    """The paper's tables: a column per (dataset, metric); our row, and the paper's when comparable."""
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
            cells[1].append(" ".join(label.rjust(7) for _, label in cols).rjust(width))
            cells[2].append(" ".join(fmt(got.get(k)) for k, _ in cols).rjust(width))
            cells[3].append(" ".join(fmt(want.get(k)) for k, _ in cols).rjust(width))
        heads = ["", "", "Uni-Med (ours)", "Uni-Med (paper)"]
        table = [heads[i].ljust(16) + " | " + " | ".join(cells[i]) for i in range(4 if paper else 3)]
        lines += [title, *table, ""]
    return "\n".join(lines)


def fmt(value) -> str:
    return "   -   " if value is None else f"{value:7.2f}"


def evaluate(ckpt_path: str, data_root: Optional[str] = None, names: Optional[list] = None,
             limit: Optional[int] = None, batch_size: Optional[int] = None, out: Optional[str] = None,
             llama: Optional[str] = None, vit: Optional[str] = None, device: Optional[str] = None,
             model: Optional[UniMed] = None) -> dict:
    """Score a checkpoint on the test splits; returns (and writes) results.json's content."""
    ckpt = read_checkpoint(ckpt_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (GPU_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE)
    config = ckpt.get("config", {})
    demo = bool(config.get("demo")) if ckpt.get("format") == "unimed-ckpt" else False
    data_root = data_root or (config.get("data_root") and locate(config["data_root"], ckpt_path))
    if not data_root:
        raise ValueError(f"{ckpt_path} does not record a data root: name it with --data-root")
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                              f"eval_{os.path.splitext(os.path.basename(ckpt_path))[0]}")
    os.makedirs(out, exist_ok=True)

    datasets = data.load_datasets(data_root, "test", names=names, train=False)
    if not datasets:
        raise FileNotFoundError(f"no test split of any dataset under {data_root} (expected the "
                                f"official layout, e.g. {os.path.join(data_root, 'Slake-VQA', 'test.txt')})")
    model = model or build_model(ckpt, ckpt_path, llama, vit, device)

    results = {"checkpoint": os.path.abspath(ckpt_path), "step": ckpt.get("step", ckpt.get("epoch")),
               "data_root": os.path.abspath(data_root), "demo": demo, "limit": limit, "datasets": {}}
    for name, dataset in datasets.items():
        records = evaluate_dataset(model, name, dataset, out, batch_size, limit)
        task = data.TASK_OF[name]
        results["datasets"][name] = {"task": task, "n": len(records),
                                     "metrics": dataset_scores(task, records)}
    if not demo:
        results["paper"] = {n: PAPER[n] for n in results["datasets"] if n in PAPER}
    write_json(os.path.join(out, "results.json"), results)
    print(format_tables(results["datasets"], paper=not demo))
    if limit is not None:
        print(f"(first {limit} test samples of each dataset only: not comparable with the paper)")
    print(f"results: {os.path.join(out, 'results.json')}; predictions: {out}/predictions_*.jsonl")
    return results


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
    p.add_argument("--out", help="output directory (default: eval_<checkpoint stem>/ beside it)")
    p.add_argument("--llama", help="HF LLaMA-2 directory (default: the one recorded in the checkpoint)")
    p.add_argument("--vit", help="EVA ViT-g .safetensors (default: the one recorded in the checkpoint)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--analysis", metavar="OUT_DIR",
                   help="run the tug-of-war analysis (analysis.py: Figures 2, 4, 5) instead of the evaluation")
    p.add_argument("--batches", type=int, default=100,
                   help="with --analysis: sampled training batches per dataset (paper 100)")
    args = p.parse_args(argv)
    if args.analysis:
        import analysis  # the paper's Section 3.1.1 / 4.3 analysis; it loads checkpoints with this file's code
        forwarded = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                     for flag in ("data_root", "datasets", "llama", "vit", "device")
                     if getattr(args, flag) is not None]
        return analysis.main(args.checkpoint + ["--out", args.analysis, f"--batches={args.batches}"] + forwarded)
    if len(args.checkpoint) > 1:
        p.error("evaluate one checkpoint at a time (two are for --analysis)")
    names = args.datasets.split(",") if args.datasets else None
    try:
        evaluate(args.checkpoint[0], args.data_root, names, args.limit, args.batch_size, args.out,
                 args.llama, args.vit, args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
