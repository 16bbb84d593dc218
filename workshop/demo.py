"""The built-in demo: what a real run downloads, in miniature, written in the official formats.

    python -m workshop.demo DIR [--seed N]    # only the datasets, under DIR (train.py builds all of demo/)

No machine here reaches a model hub or a dataset host, and a new user should see the whole system
work in minutes. So `train.py` without --llama/--vit/--data-root builds `demo/` once (`build_demo`):
- data/: a miniature of each of the 12 datasets in its official on-disk layout (`make_demo`), read by
  the real loaders in data.py, with procedurally drawn images whose content decides the answers;
- eva.safetensors: a tiny random EVA under the official key names;
- llama/: a tiny LLaMA in the HF format with a sentencepiece tokenizer, pre-trained on the demo's
  text so that it models the language and the connector has to bring in what only the image shows.
Then it trains with the demo's schedule (train.SCHEDULES["demo"]) and task mixture (`DEMO_RATIOS`).
The same seed writes the same bytes on the same machine.
"""
import argparse
import csv
import io
import json
import math
import os
import pickle
import zipfile

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw
import safetensors.torch
from tqdm import tqdm

import data
from lib.files import atomic
from model import Llama, LlamaConfig, Tokenizer, build_prompt
from vision import EVAConfig, EVAViT
from workshop.hf import save_pretrained

# -------------------------------------------------------------------------------------------------
# The datasets in miniature: each in its official layout, with learnable content.
# What is drawn decides the answer: a bright blob's quadrant answers "which side?" and is the
# referring box, shapes and textures decide the classes, reports are written from the drawn
# findings, and text QA follows a keyword -> answer table. Classes are balanced; train and test
# never share an image, a question or an id.

# What the demo is claimed to learn, dataset by dataset: the headline metric, its chance level (and
# why it is that), and the lead over chance we claim: a multiple of 5 at least 3 points below the
# least lead of the 10 seeds of docs/demo.md's table and of command 1's run (python bench/seeds.py
# reruns the seeds; the slow test checks command 1).
DEMO_CLAIMS = {
    "slake_vqa": ("f1", 50, 25, "every question has 2 answers: left/right, upper/lower"),
    "path_vqa": ("f1", 50, 25, "pink/purple, yes/no"),
    "slake_rec": ("r@0.5", 25, 15, "the box is one of 4 quadrants"),
    "sa_med2d_rec": ("r@0.5", 25, 15, "the box is one of 4 quadrants"),
    "slake_reg": ("acc", 50, 30, "tumor / kidney"),
    "sa_med2d_reg": ("acc", 50, 25, "liver / spleen"),
    "mimic_cxr": ("bleu4", 12.8, 60, "always the most frequent of the 9 training reports, which share words"),
    "medpix": ("bleu4", 61.9, 15, "always the most frequent of the 8 training captions; one test caption "
                                  "reads None, as some real ones do"),
    "dermamnist": ("acc", 100 / 3, 50, "melanoma / melanocytic nevi / vascular lesions"),
    "organsmnist": ("acc", 100 / 3, 60, "bladder / heart / liver"),
    "medqa": ("acc", 25, 70, "4 organs"),
    "pubmedqa": ("acc", 37.5, 55, "yes / no / maybe: 6 of the 16 test answers are yes"),
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
    with atomic(path) as f:
        f.write(content)


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
                _, (liver, spleen) = _two_objects(rng, draw, i, 64, 64,
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


# -------------------------------------------------------------------------------------------------
# The tiny base weights, and the demo as train.py builds it

DEMO_DIR = "demo"
DEMO_LLAMA = dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=512, vocab_size=640, max_seq_len=512)
DEMO_EVA = EVAConfig(img_size=112, patch_size=14, width=96, depth=2, num_heads=4, mlp_dim=384)
# The demo's task mixture: the official ratios would spend a third of the steps on captions the tiny
# model writes perfectly within a few hundred, and too few on the skills it learns last: REC and REG
# (binding a named object to its region; ~1900 and ~1270 of the 5000 steps here), then VQA (docs/demo.md).
DEMO_RATIOS = {"medqa": 2, "pubmedqa": 2, "slake_vqa": 6, "path_vqa": 5, "slake_rec": 15, "slake_reg": 10,
               "sa_med2d_rec": 15, "sa_med2d_reg": 10, "medpix": 4, "mimic_cxr": 3, "medmnist": 7}
DEMO_PRETRAIN = dict(steps=300, batch=16, block=96, lr=3e-3)  # next-token pre-training of the LLaMA


def demo_paths(root: str = DEMO_DIR) -> tuple[str, str, str]:
    return os.path.join(root, "llama"), os.path.join(root, "eva.safetensors"), os.path.join(root, "data")


def demo_base(build: bool, hint: str = "", root: str = DEMO_DIR) -> dict:
    """What train.py trains on when no weights are given (README command 1): the demo's base
    weights and data, built on first use (by one process: `build`), and its task mixture."""
    llama_dir, vit_path, data_root = demo_paths(root)
    if build:
        print(f"No --llama/--vit/--data-root given: running the built-in demo (tiny weights and data in "
              f"{root}/). Real run: python train.py --llama DIR --vit eva_vit_g.safetensors --data-root DIR {hint}")
        build_demo(root)
    return dict(llama_dir=llama_dir, vit_path=vit_path, data_root=data_root, vit=DEMO_EVA, ratios=DEMO_RATIOS)


def build_demo(root: str = DEMO_DIR, pretrain: dict = DEMO_PRETRAIN, seed: int = 0) -> None:
    """Write what a real run downloads, in miniature: the datasets (make_demo), a tiny EVA
    (.safetensors, official key names) and a tiny LLaMA (HF directory + sentencepiece tokenizer).

    A frozen random LLaMA is no base for LoRA to adapt, so the tiny LLaMA is pre-trained for a few
    hundred steps on the demo's training text: it then models the language, and the connector has
    to bring in what only the image shows. Deterministic for a given seed.
    """
    llama_dir, vit_path, data_root = demo_paths(root)
    if not os.path.isdir(data_root):
        make_demo(data_root, seed=seed)
    if not os.path.exists(vit_path):
        torch.manual_seed(seed)
        vit = EVAViT(DEMO_EVA)
        # EVAViT leaves zeros for the checkpoint to fill. A trained ViT's features say where each
        # patch is, and its position embeddings vary smoothly with the patch's row and column. A
        # random ViT's features say so only if its position embeddings are as large as its patch
        # embeddings (~0.5 here, not EVA's initial std 0.02), and "left" is one direction in them
        # only if they are smooth: so 2-D sin-cos ones (as MAE's). Without this, REC, REG and
        # "which side?" are learned late or not at all.
        with torch.no_grad():
            vit.pos_embed[0, 1:] = sincos_2d(DEMO_EVA.grid, DEMO_EVA.width)
        torch.nn.init.trunc_normal_(vit.cls_token, std=0.02)
        _save(vit_path, safetensors.torch.save({k: v.contiguous() for k, v in vit.state_dict().items()},
                                               metadata={"format": "pt"}))
    if not os.path.exists(os.path.join(llama_dir, "model.safetensors")):
        texts = demo_texts(data_root)
        os.makedirs(llama_dir, exist_ok=True)
        write_tokenizer(texts, os.path.join(llama_dir, "tokenizer.model"), DEMO_LLAMA["vocab_size"])
        tokenizer = Tokenizer(os.path.join(llama_dir, "tokenizer.model"))
        config = LlamaConfig(**{**DEMO_LLAMA, "vocab_size": tokenizer.vocab_size})
        torch.manual_seed(seed)
        llama = Llama(config)
        for module in llama.modules():  # the usual LM init: small weights, so early training is stable
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
        pretrain_llama(llama, tokenizer, texts, seed=seed, **pretrain)
        save_pretrained(llama, llama_dir)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] position embeddings of a grid x grid patch raster: half of the channels
    encode the row, half the column, as the sines and cosines of dim/4 frequencies. MAE's fixed
    embeddings, with frequencies from 1 down to ~1/grid (not 1/10000) so that every channel varies
    across a small grid; their std is then ~0.5."""
    pos = torch.arange(grid, dtype=torch.float32)
    freq = 1.0 / grid ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    angle = pos[:, None] * freq[None]                                    # [grid, dim/4]
    wave = torch.cat([angle.sin(), angle.cos()], dim=1)                  # [grid, dim/2]
    rows, cols = wave[:, None].expand(grid, grid, -1), wave[None].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


def demo_texts(data_root: str) -> list[str]:
    """The training split's prompts and answers as chat text, the way Uni-Med will see them
    (training templates taken in turn)."""
    texts = []
    for dataset in data.load_datasets(data_root, "train", train=True).values():
        for i in range(len(dataset)):
            s = dataset.get(i, i % len(dataset.templates))
            texts.append(f"{build_prompt(s.instruction, s.image is not None, train=True)} {s.answer}")
    return texts


def write_tokenizer(texts: list[str], path: str, vocab_size: int) -> None:
    """Train a LLaMA-style sentencepiece BPE (byte fallback, split digits, <unk>/<s>/</s> = 0/1/2).

    One difference from LLaMA-2's: runs of spaces fold into one. Training prompts have two spaces
    before [/INST] and evaluation prompts one (model.build_prompt), as in the official code. A
    real LLaMA reads both alike; a tiny one trained on one form answers the other far worse
    (Slake-REG accuracy 75 in the evaluation's form, 100 in training's: same checkpoint, same
    test images)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=True,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2)
    _save(path, model.getvalue())


def pretrain_llama(llama, tokenizer, texts, steps, batch, block, lr, seed) -> None:
    """nanoGPT-style next-token training on the concatenated texts (random windows of `block`)."""
    stream = torch.tensor([t for text in texts for t in tokenizer.encode(text, bos=True) + [tokenizer.eos_id]])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llama.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    llama.train()
    bar = tqdm(range(steps), desc="demo: pre-training the tiny LLaMA", leave=False)
    for step in bar:
        start = torch.randint(len(stream) - block - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + block + 1] for s in start.tolist()])  # [batch, block + 1]
        logits = llama(x[:, :-1])  # [batch, block, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        for group in opt.param_groups:  # cosine to zero: the last steps settle the weights
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    llama.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the miniature of every dataset under DIR")
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_demo(args.dir, args.seed)
    for split in ("train", "test"):
        sizes = {n: len(d) for n, d in data.load_datasets(args.dir, split, train=False).items()}
        print(f"{split}: {sum(sizes.values())} samples  " + "  ".join(f"{n} {k}" for n, k in sizes.items()))
