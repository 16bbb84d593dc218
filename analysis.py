"""The tug-of-war analysis (paper Sections 3.1.1 and 4.3, Figures 2, 4 and 5), on any checkpoint.

Why does a mixture of connector experts help? Because the tasks pull one shared connector in
different directions. This file measures that pull and draws the paper's pictures:

  gradients   a fixed number of sampled training batches per dataset (the paper: 100), the gradient
              of each batch's loss at the connector (or, as an option, at the LoRA weights):
                GD  Eq. 1-2: how a normalised step on task j changes task i's loss, relative to a
                    step on task i itself (1: helps as much, < 0: hurts)
                GM  Eq. 3: similarity of the mean gradient magnitudes (1: equal)
                index of task i, Eq. 4: sum_j GD_ij GM_ij, divided by the maximum when comparing
                    checkpoints (Section 4.3)
                statistics score of every parameter, Eq. 5: |sum_t g_t| / sum_t |g_t| (1: all
                    tasks push it the same way), as a histogram over ten intervals of [0, 1]
  routing     the mean weight of each connector expert per task and per dataset
  features    the visual features of a fixed number of samples per task before the connector (the
              resampled ViT tokens) and after it (the LLM input embeddings), each mean-pooled over
              its tokens, embedded in 2-D by exact t-SNE (written here in numpy)
  curves      a training log (train.py's ckpt.jsonl) as one picture: loss per task, learning rate,
              gradient norm, and each image task's routing weights over the steps (Figure 4c as it
              forms); train.py draws it at the end of every run and on `train.py --plot LOG`

    python evaluate.py ckpt.pt --analysis OUT_DIR            # one checkpoint
    python analysis.py mlp.pt cmoe.pt --out OUT_DIR          # Figure 4: two checkpoints side by side
    python analysis.py OUT_A/analysis.json cmoe.pt --out B   # reuse the numbers of an earlier run

The entry point for other code is

    run(model: UniMed, datasets: dict[str, data.TaskDataset], out_dir: str,
        config: AnalysisConfig = AnalysisConfig(), label: str = "model", baseline=None) -> dict

`datasets` should be the training split with the MedMNIST sets kept apart
(`data.load_datasets(root, "train", train=False)`); `baseline` is an earlier result (the dict
`run` returns, or the path of its analysis.json) drawn next to this one. Output in out_dir:
analysis.json (every number) and the PNG figures listed in its "figures" entry, with their sizes.

Memory. The official connector has ~707M parameters: one fp32 copy is 2.8 GB. Eq. 2 needs, for
every batch of task i, its gradient's dot product with the mean normalised gradient of every task j,
which is only known once all of j's batches are seen. So the batches are run twice (same batches,
dropout off, so the gradients agree): pass 1 accumulates each dataset's mean normalised gradient
(stored in bf16: half the memory, with fp32's range, which fp16 lacks for entries ~1/sqrt(7e8)) and
each task's mean gradient (bf16, for Eq. 5); pass 2 takes the dot products in fp32, chunk by chunk.
What is kept: (datasets + tasks) x parameters x 2 bytes, e.g. (10 + 5) x 1.4 GB = 21 GB, on the
model's device.
"""
import argparse
import contextlib
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import zip_longest
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
from cmoe import IMAGE_TASKS, resample
from files import read_json, read_jsonl, write_json
from lora import lora_layers
from model import UniMed, checkpoint_data_root, read_checkpoint

TASKS = IMAGE_TASKS + ("qa",)  # display order
STORE = torch.bfloat16  # storage of the per-dataset and per-task mean gradients (see the docstring)
CHUNK = 1 << 24  # elements per fp32 temporary when reducing over stored gradients
BINS = 10  # Eq. 5 histogram: ten intervals of [0, 1]


@dataclass
class AnalysisConfig:
    batches: int = 100  # sampled batches per dataset (the paper: 100)
    batch_size: int = 4  # samples per batch, as in training
    target: str = "connector"  # where gradients are taken: "connector" (the paper) or "lora"
    samples_per_task: int = 200  # t-SNE points per task (the paper: 200)
    perplexity: float = 30.0
    tsne_iters: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.target not in ("connector", "lora"):
            raise ValueError(f"AnalysisConfig.target={self.target!r}: expected 'connector' or 'lora'")
        for field in ("batches", "batch_size", "samples_per_task", "tsne_iters"):
            if getattr(self, field) < 1:
                raise ValueError(f"AnalysisConfig.{field}={getattr(self, field)}: must be >= 1")


# -------------------------------------------------------------------------------------------------
# The equations, on plain tensors. K tasks (or datasets), P shared parameters, n batches.

def unit_mean(grads: torch.Tensor) -> torch.Tensor:
    """E_x[g / ||g||_2] of one task's batch gradients [n, P] -> [P]: the direction of Eq. 1's step."""
    return (grads / grads.norm(dim=1, keepdim=True)).mean(0)


def interference(unit_means: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Eq. 1: Delta_j L_i(x_i) ~= lambda E_xj[g_j^T / ||g_j||] g_i(x_i), for every batch x_i of task i
    (grads [n, P]) and every task j (unit_means [K, P]) -> [n, K]. lambda = 1: it cancels in Eq. 2."""
    return grads @ unit_means.T


def gradient_direction(dots: list) -> torch.Tensor:
    """Eq. 2: GD_ij = E_xi[Delta_j L_i(x_i) / Delta_i L_i(x_i)]; dots[i] is Eq. 1 for task i's
    batches, [n_i, K] -> [K, K]. GD_ii = 1; GD_ij < 0: a step for task j increases task i's loss."""
    return torch.stack([(d / d[:, i:i + 1]).mean(0) for i, d in enumerate(dots)])


def gradient_magnitude(mean_norms: torch.Tensor) -> torch.Tensor:
    """Eq. 3: GM_ij = 2 E||g_i|| E||g_j|| / ((E||g_i||)^2 + (E||g_j||)^2), from E||g|| per task [K]
    -> [K, K], symmetric, in [0, 1], 1 where the magnitudes are equal."""
    a, b = mean_norms[:, None], mean_norms[None, :]
    return 2 * a * b / (a ** 2 + b ** 2)


def tug_of_war(gd: torch.Tensor, gm: torch.Tensor) -> torch.Tensor:
    """Eq. 4: index of task i = sum_j GD_ij GM_ij (j = i included, as written), [K, K] -> [K]."""
    return (gd * gm).sum(1)


def statistics_score(task_grads: torch.Tensor) -> torch.Tensor:
    """Eq. 5: |sum_t g_t| / sum_t |g_t| per parameter, from the tasks' mean gradients [T, ...] -> [...].
    1: every task pushes the parameter the same way; 0: they cancel. NaN where no task moves it."""
    return task_grads.sum(0).abs() / task_grads.abs().sum(0)


def score_histogram(scores: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Counts of scores in the intervals [k/bins, (k+1)/bins) (the last one closed); NaN skipped."""
    scores = scores[~scores.isnan()].flatten()
    return torch.bincount((scores * bins).long().clamp(0, bins - 1), minlength=bins)


def group_by_task(names: list, dots: list, norms: list) -> tuple[list, list, torch.Tensor]:
    """Datasets -> tasks. A task's mean normalised gradient is the batch-weighted mean of its
    datasets', so by linearity its column of Eq. 1 is the same mix of theirs; its batches are all
    of its datasets' batches. -> (tasks, dots per task [n_T, T], E||g|| per task [T])."""
    tasks = [t for t in TASKS if any(data.TASK_OF[n] == t for n in names)]
    member = torch.tensor([[float(data.TASK_OF[n] == t) for n in names] for t in tasks], dtype=torch.float64)
    counts = torch.tensor([float(len(d)) for d in dots], dtype=torch.float64)  # batches per dataset [K]
    mix = member * counts / (member * counts).sum(1, keepdim=True)  # [T, K], rows sum to 1
    task_dots, task_norms = [], []
    for t in tasks:
        rows = [k for k, n in enumerate(names) if data.TASK_OF[n] == t]
        task_dots.append(torch.cat([dots[k] for k in rows]) @ mix.T)  # [n_T, T]
        task_norms.append(torch.cat([norms[k] for k in rows]).mean())
    return tasks, task_dots, torch.stack(task_norms)


# -------------------------------------------------------------------------------------------------
# Exact t-SNE (van der Maaten and Hinton, 2008), in numpy

def tsne(x: np.ndarray, perplexity: float = 30.0, iters: int = 1000, seed: int = 0,
         progress: Optional[str] = None) -> np.ndarray:
    """[n, d] -> [n, 2]. PCA to 50 dimensions, Gaussian affinities whose widths are found by binary
    search to match the perplexity, Student-t similarities in 2-D, gradient descent with momentum,
    per-coordinate gains and early exaggeration (12 for the first 250 steps), as in sklearn."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 4:
        raise ValueError(f"tsne: needs at least 4 points, got {n}")
    x = x - x.mean(0)
    if x.shape[1] > 50:
        x = x @ np.linalg.svd(x, full_matrices=False)[2][:50].T  # [n, 50]
    sq = (x ** 2).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)  # squared distances [n, n]
    p = affinities(dist, min(perplexity, (n - 1) / 3))
    p = np.maximum((p + p.T) / (2 * n), 1e-12)  # joint probabilities, symmetric

    y = np.random.default_rng(seed).normal(0, 1e-4, (n, 2))
    update, gains = np.zeros_like(y), np.ones_like(y)
    lr = max(n / 12 / 4, 50.0)  # sklearn's "auto" learning rate
    for it in tqdm(range(iters), desc=progress or "t-SNE", leave=False, disable=progress is None):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        sy = (y ** 2).sum(1)
        num = 1 / (1 + sy[:, None] + sy[None, :] - 2 * y @ y.T)  # Student-t kernel [n, n]
        np.fill_diagonal(num, 0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (exaggeration * p - q) * num
        grad = 4 * (w.sum(1)[:, None] * y - w @ y)  # dKL/dy
        same = np.sign(grad) == np.sign(update)
        gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y -= y.mean(0)
    return y


def affinities(dist: np.ndarray, perplexity: float, tol: float = 1e-5, steps: int = 200) -> np.ndarray:
    """Conditional p_{j|i} = exp(-beta_i d_ij) / sum, with each beta_i found by bisection so that
    the row's entropy is log(perplexity). All rows are searched at once."""
    n = len(dist)
    own = np.eye(n, dtype=bool)  # a point is not its own neighbour
    d = dist - np.where(own, np.inf, dist).min(1, keepdims=True)  # nearest neighbour at 0: no underflow
    d[own] = 0
    target = math.log(perplexity)
    beta, lo, hi = np.ones(n), np.zeros(n), np.full(n, np.inf)
    for _ in range(steps):
        p = np.exp(-d * beta[:, None])
        p[own] = 0
        total = p.sum(1)
        entropy = np.log(total) + beta * (d * p).sum(1) / total
        if np.all(np.abs(entropy - target) < tol):
            break
        too_wide = entropy > target  # too many neighbours: narrow the Gaussian (larger beta)
        lo, hi = np.where(too_wide, beta, lo), np.where(too_wide, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    return p / total[:, None]


# -------------------------------------------------------------------------------------------------
# Gradients of a model, streamed (see the memory note at the top)

def target_parameters(model, target: str) -> list:
    """The shared parameters theta of Eq. 1: the connector's (router and task tokens included), or the
    LoRA adapters' -> [(name, parameter)]."""
    if target == "connector":
        params = [(f"connector.{n}", p) for n, p in model.connector.named_parameters()]
    else:
        params = [(f"{name}.{n}", p) for name, layer in lora_layers(model).items()
                  for n, p in layer.named_parameters() if not n.startswith("base.")]
    if not params:
        raise ValueError(f"analysis: the model has no {target} parameters to take gradients at")
    return params


@contextlib.contextmanager
def gradients_for(model, params: list):
    """Only `params` take gradients (backward skips the others) and dropout is off, so the two passes
    over the same batches see the same gradients. Restores the model afterwards."""
    wanted = {id(p) for _, p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in saved:
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def sample_batches(dataset, count: int, batch_size: int, seed: int) -> list:
    """`count` batches of (index, training template) of one dataset: a seeded shuffle, reshuffled when
    used up (as the training loader), each sample with a training template drawn at random."""
    g = torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(dataset.name.encode()))
    order = []
    while len(order) < count * batch_size:
        order += torch.randperm(len(dataset), generator=g).tolist()
    templates = torch.randint(len(dataset.templates), (count * batch_size,), generator=g).tolist()
    pairs = list(zip(order, templates))
    return [pairs[b * batch_size:(b + 1) * batch_size] for b in range(count)]


def batch_gradient(model, params: list, dataset, plan: list) -> tuple:
    """One sampled batch through the model -> (gradient per parameter (fp32), loss, mean routing
    weight per expert [N] or None)."""
    batch = data.collate([dataset.get(i, t) for i, t in plan], image_size=model.image_size)
    images = None if batch.images is None else batch.images.to(params[0][1].device)
    for _, p in params:
        p.grad = None
    loss, routing = model(images, batch.instructions, batch.answers, batch.task)  # autocasts itself
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
    routing = None if routing is None else routing.float().mean((0, 1)).cpu()  # [N]
    return grads, loss.item(), routing


def dot(stored: list, grads: list) -> float:
    """sum over parameters of stored . grad, in fp32, CHUNK elements at a time (bounded temporaries)."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for a, b in zip(stored, grads):
        a, b = a.flatten(), b.flatten()
        for s in range(0, a.numel(), CHUNK):
            total += torch.dot(a[s:s + CHUNK].float(), b[s:s + CHUNK].float()).double()
    return total.item()


def gradient_statistics(model, datasets: dict, names: list, config: AnalysisConfig) -> dict:
    """Both passes over the sampled batches of `names` -> Eq. 1 dots, norms, losses, routing, Eq. 5."""
    params = target_parameters(model, config.target)
    plans = {n: sample_batches(datasets[n], config.batches, config.batch_size, config.seed) for n in names}
    with gradients_for(model, params):
        first = first_pass(model, params, datasets, plans, config)
        dots = second_pass(model, params, datasets, plans, first.pop("units"))
    tasks, task_means = list(first["task_means"]), first.pop("task_means")
    counts = torch.zeros(BINS, dtype=torch.long)
    for k, (_, p) in enumerate(params):  # Eq. 5, parameter by parameter, chunk by chunk
        for s in range(0, p.numel(), CHUNK):
            g = torch.stack([task_means[t][k].flatten()[s:s + CHUNK].float() for t in tasks])  # [T, chunk]
            counts += score_histogram(statistics_score(g)).cpu()
    n_params = sum(p.numel() for _, p in params)
    return {**first, "dots": dots, "parameters": n_params, "score_counts": counts.tolist(),
            "score_tasks": tasks, "no_gradient": n_params - int(counts.sum())}


def first_pass(model, params: list, datasets: dict, plans: dict, config: AnalysisConfig) -> dict:
    """E[g/||g||] per dataset (Eq. 1; bf16), ||g|| per batch (Eq. 3), each task's mean gradient
    (Eq. 5; bf16), the losses and the mean routing weights."""
    units, sums, batches = {}, {}, {}
    norms, losses, routing = {n: [] for n in plans}, {n: [] for n in plans}, {}
    bar = tqdm(total=sum(map(len, plans.values())), desc="gradients, pass 1/2", unit="batch", dynamic_ncols=True)
    for n, plan in plans.items():
        unit = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]  # fp32 while accumulating
        summed = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
        weights = []
        for b, batch in enumerate(plan):
            grads, loss, mean_routing = batch_gradient(model, params, datasets[n], batch)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
            if not norm > 0:  # g/||g|| of Eq. 1 is undefined
                raise ValueError(f"analysis: dataset {n}, sampled batch {b}: the gradient at the "
                                 f"{config.target} is {norm} (a frozen or untrained {config.target}?)")
            for u, s, g in zip(unit, summed, grads):
                u.add_(g, alpha=1 / norm)
                s.add_(g)
            norms[n].append(norm)
            losses[n].append(loss)
            weights += [] if mean_routing is None else [mean_routing]
            bar.update()
        units[n] = [(u / len(plan)).to(STORE) for u in unit]
        t = data.TASK_OF[n]
        sums[t] = [(o.float() + s).to(STORE) for o, s in zip(sums[t], summed)] if t in sums else \
                  [s.to(STORE) for s in summed]
        batches[t] = batches.get(t, 0) + len(plan)
        routing[n] = torch.stack(weights).mean(0).tolist() if weights else None
        del unit, summed
    bar.close()
    task_means = {t: [(s.float() / batches[t]).to(STORE) for s in sums.pop(t)]
                  for t in TASKS if t in sums}
    return {"units": units, "task_means": task_means, "norms": norms, "losses": losses, "routing": routing}


def second_pass(model, params: list, datasets: dict, plans: dict, units: dict) -> dict:
    """The same batches again: each gradient's dot product with every dataset's E[g/||g||] (Eq. 1)."""
    dots = {n: [] for n in plans}
    with tqdm(total=sum(map(len, plans.values())), desc="gradients, pass 2/2", unit="batch", dynamic_ncols=True) as bar:
        for n, plan in plans.items():
            for batch in plan:
                grads, _, _ = batch_gradient(model, params, datasets[n], batch)
                dots[n].append([dot(units[j], grads) for j in plans])  # [K] per batch
                bar.update()
    return dots


# -------------------------------------------------------------------------------------------------
# Visual features before and after the connector (Figure 5)

@torch.no_grad()
def visual_features(model, datasets: dict, names: list, per_task: int, seed: int, batch_size: int = 16) -> dict:
    """`per_task` samples of each image task (spread evenly over its datasets), features mean-pooled
    over tokens: before = the resampled ViT tokens [n, token_width], after = the connector's output
    [n, llm_width], which is what the LLM reads."""
    picks = []  # (dataset, index): each task's datasets take turns, in a seeded order each
    for t in IMAGE_TASKS:
        orders = [[(n, i) for i in torch.randperm(len(datasets[n]), generator=torch.Generator().manual_seed(
                   seed * 2 ** 32 + zlib.crc32(n.encode()) + 1)).tolist()] for n in names if data.TASK_OF[n] == t]
        turns = [pick for round_ in zip_longest(*orders) for pick in round_ if pick is not None]
        picks += turns[:per_task]
    if not picks:
        return None
    cfg, device = model.connector.config, next(model.connector.parameters()).device
    before, after = [], []
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(picks), batch_size), desc="features", unit="batch", dynamic_ncols=True):
        chunk = picks[s:s + batch_size]
        # a batch may mix datasets of one task; cut it at task changes (the connector takes one task)
        for t in dict.fromkeys(data.TASK_OF[n] for n, _ in chunk):
            part = [(n, i) for n, i in chunk if data.TASK_OF[n] == t]
            images = data.collate([datasets[n].get(i) for n, i in part], model.image_size).images.to(device)
            with model.autocast():  # the precision of training: bf16 maths on a bf16 base
                features = model.vision_features(images)  # [B, 256, vit_width]
                embeds, _ = model.connector(features, t)  # [B, 64, llm_width]
            before.append(resample(features.float(), cfg.resampler, cfg.rate).mean(1).cpu())  # [B, 5632]
            after.append(embeds.float().mean(1).cpu())  # [B, 4096]
    model.train(was_training)
    return {"before": torch.cat(before).numpy(), "after": torch.cat(after).numpy(),
            "tasks": [data.TASK_OF[n] for n, _ in picks], "datasets": [n for n, _ in picks],
            "ids": [datasets[n].rows[i].id for n, i in picks]}


# -------------------------------------------------------------------------------------------------
# One model: every number

def analyse(model, datasets: dict, config: AnalysisConfig, label: str = "model") -> dict:
    """The numbers of one model (a JSON-ready dict); `report` draws them."""
    names = [n for t in TASKS for n in datasets if data.TASK_OF[n] == t and len(datasets[n])]
    if config.target == "connector":
        skipped = [n for n in names if data.TASK_OF[n] == "qa"]
        if skipped:
            print(f"analysis: {', '.join(skipped)} skipped: text-only QA never reaches the connector",
                  file=sys.stderr)
        names = [n for n in names if data.TASK_OF[n] != "qa"]
    if not names:
        raise ValueError(f"analysis: no dataset with samples to take {config.target} gradients on "
                         f"(got {sorted(datasets)})")
    stats = gradient_statistics(model, datasets, names, config)
    dots = [torch.tensor(stats["dots"][n], dtype=torch.float64) for n in names]
    norms = [torch.tensor(stats["norms"][n], dtype=torch.float64) for n in names]
    tasks, task_dots, task_norms = group_by_task(names, dots, norms)

    def conflict(labels, dots, mean_norms):
        gd, gm = gradient_direction(dots), gradient_magnitude(mean_norms)  # Eq. 2, Eq. 3
        index = tug_of_war(gd, gm)  # Eq. 4
        return {"labels": labels, "gd": gd.tolist(), "gm": gm.tolist(), "index": index.tolist(),
                "mean_grad_norm": mean_norms.tolist()}

    by_dataset = conflict(names, dots, torch.stack([x.mean() for x in norms]))
    by_task = conflict(tasks, task_dots, task_norms)
    routed = {n: w for n, w in stats["routing"].items() if w is not None}  # none: no experts, or QA
    routing = {"datasets": routed, "tasks": {  # every dataset has the same number of batches
        t: np.mean([w for n, w in routed.items() if data.TASK_OF[n] == t], axis=0).tolist()
        for t in tasks if any(data.TASK_OF[n] == t for n in routed)}} if routed else None
    counts = stats["score_counts"]
    scored = max(1, sum(counts))
    features = visual_features(model, datasets, [n for n in names if data.TASK_OF[n] != "qa"],
                               config.samples_per_task, config.seed) or {"tasks": [], "datasets": [], "ids": []}
    points = len(features["tasks"])
    tsne_result = {"pooling": "mean over tokens", "tasks": features["tasks"], "datasets": features["datasets"],
                   "ids": features["ids"], "perplexity": min(config.perplexity, (points - 1) / 3)}
    for side in ("before", "after"):  # t-SNE needs a few points; fewer are drawn as "too few samples"
        tsne_result[side] = tsne(features[side], config.perplexity, config.tsne_iters, config.seed,
                                 progress=f"t-SNE {side}").tolist() if points >= 4 else None
    return {
        "label": label, "config": asdict(config), "target": config.target, "parameters": stats["parameters"],
        "datasets": {n: {"task": data.TASK_OF[n], "batches": config.batches,
                         "loss": float(np.mean(stats["losses"][n])), "grad_norms": stats["norms"][n],
                         "interference": stats["dots"][n]}  # Eq. 1 [batch][j], j over by_dataset's labels
                     for n in names},
        "by_dataset": by_dataset, "by_task": by_task,
        "statistics_score": {"tasks": stats["score_tasks"], "bins": [[k / BINS, (k + 1) / BINS] for k in range(BINS)],
                             "counts": counts, "fraction": [c / scored for c in counts],
                             "no_gradient": stats["no_gradient"]},
        "routing": routing,
        "tsne": tsne_result,
    }


# -------------------------------------------------------------------------------------------------
# Drawing, with Pillow only

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225)
TASK_COLOURS = {"vqa": (31, 119, 180), "refer": (255, 127, 14), "identify": (44, 160, 44),
                "caption": (214, 39, 40), "cls": (148, 103, 189), "qa": (140, 86, 75)}
SERIES_COLOURS = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),  # seaborn deep
                  (147, 120, 96), (218, 139, 195), (140, 140, 140), (204, 185, 116), (100, 181, 205)]
DIVERGING = [(33, 102, 172), (103, 169, 207), (247, 247, 247), (239, 138, 98), (178, 24, 43)]  # blue-white-red
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font


def colour(scale: list, t: float) -> tuple:
    """t in [0, 1] -> RGB, linear between the scale's evenly spaced anchors."""
    t = min(max(float(t), 0.0), 1.0) * (len(scale) - 1)
    k = min(int(t), len(scale) - 2)
    a, b, f = scale[k], scale[k + 1], t - k
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))


def ink_on(rgb: tuple) -> tuple:
    return BLACK if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else WHITE


def text(canvas: Image.Image, xy: tuple, s: str, size: int = 14, anchor: str = "mm", angle: int = 0,
         fill: tuple = BLACK) -> tuple:
    """Draw `s` with its box anchored at xy ("l/m/r" then "t/m/b"), rotated by `angle` degrees
    counter-clockwise; returns the (width, height) it took."""
    f = font(size)
    left, top, right, bottom = f.getbbox(s)
    stamp = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(stamp).text((-left, -top), s, font=f, fill=fill)
    stamp = stamp.rotate(angle, expand=True)
    w, h = stamp.size
    x = xy[0] - {"l": 0, "m": w // 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h // 2, "b": h}[anchor[1]]
    canvas.paste(stamp, (int(x), int(y)), stamp)
    return w, h


def text_size(s: str, size: int = 14) -> tuple:
    left, top, right, bottom = font(size).getbbox(s)
    return right - left, bottom - top


def colour_bar(canvas, x: int, y: int, height: int, scale: list, vmin: float, vmax: float, label: str) -> None:
    """A vertical colour scale at (x, y): vmax at the top, three ticks, and its label beside it."""
    draw = ImageDraw.Draw(canvas)
    for k in range(height):
        draw.line([(x, y + k), (x + 18, y + k)], fill=colour(scale, 1 - k / max(1, height - 1)))
    draw.rectangle([x, y, x + 18, y + height], outline=BLACK)
    width = 0
    for v, yy in ((vmax, y), ((vmin + vmax) / 2, y + height // 2), (vmin, y + height)):
        draw.line([(x + 18, yy), (x + 23, yy)], fill=BLACK)
        width = max(width, text(canvas, (x + 26, yy), f"{v:.2f}", 12, "lm")[0])
    text(canvas, (x + 32 + width, y + height // 2), label, 13, "lm", angle=90)


def heatmap(matrix, rows: list, cols: list, title: str, scale: list, vmin: float, vmax: float,
            xlabel: str, ylabel: str, bar_label: str, cell: int = 62) -> Image.Image:
    """A matrix as coloured cells with their values written in, labelled axes and a colour bar."""
    matrix = np.asarray(matrix, dtype=float)
    row_w = max(text_size(r, 14)[0] for r in rows)
    col_h = max(text_size(c, 14)[0] for c in cols)
    left, top = 40 + row_w + 10, 46
    grid_w, grid_h = cell * len(cols), cell * len(rows)
    width = max(left + grid_w + 120, text_size(title, 17)[0] + 40)
    height = top + grid_h + col_h + 52
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 22), title, 17)
    for i, r in enumerate(rows):
        text(img, (left - 8, top + i * cell + cell // 2), r, 14, "rm")
        for j in range(len(cols)):
            v = matrix[i, j]
            fill = LIGHT if not np.isfinite(v) else colour(scale, (v - vmin) / (vmax - vmin))
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell]
            draw.rectangle(box, fill=fill, outline=WHITE)
            text(img, (box[0] + cell // 2, box[1] + cell // 2), "n/a" if not np.isfinite(v) else f"{v:.2f}",
                 13, fill=ink_on(fill))
    for j, c in enumerate(cols):
        text(img, (left + j * cell + cell // 2, top + grid_h + 6), c, 14, "mt", angle=90)
    text(img, (left + grid_w // 2, height - 8), xlabel, 14, "mb")
    text(img, (12, top + grid_h // 2), ylabel, 14, "lm", angle=90)
    colour_bar(img, left + grid_w + 16, top, grid_h, scale, vmin, vmax, bar_label)
    return img


def bar_chart(groups: list, series: dict, title: str, ylabel: str, xlabel: str, fmt: str = "{:.2f}") -> Image.Image:
    """Grouped bars: one group per x label, one bar per series (checkpoint), with a legend."""
    values = np.array(list(series.values()), dtype=float)  # [S, G]
    lo, hi = min(0.0, np.nanmin(values)), max(0.0, np.nanmax(values))
    span = hi - lo if hi > lo else 1.0
    ticks = nice_ticks(lo - (0.08 * span if lo < 0 else 0), hi + 0.12 * span)  # room for the value labels
    lo, hi = ticks[0], ticks[-1]
    bar = 22 if len(series) > 1 else 34
    group_w = bar * len(series) + 26
    rotate = max(text_size(g, 13)[0] for g in groups) > group_w - 4  # x labels upright when they fit
    label_h = max(text_size(g, 13)[0 if rotate else 1] for g in groups)
    left, top, plot_h = 80, 50, 300
    plot_w = max(group_w * len(groups), 280)
    legend_w = max(text_size(s, 13)[0] for s in series) + 60
    width = max(left + plot_w + legend_w + 20, text_size(title, 17)[0] + 40)
    height = top + plot_h + label_h + 50
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 22), title, 17)
    y_of = lambda v: top + plot_h - (v - lo) / (hi - lo) * plot_h
    for v in ticks:  # horizontal grid and tick labels
        draw.line([(left, y_of(v)), (left + plot_w, y_of(v))], fill=LIGHT)
        text(img, (left - 6, y_of(v)), tick_label(v, ticks[1] - ticks[0]), 12, "rm")
    draw.line([(left, y_of(0)), (left + plot_w, y_of(0))], fill=GREY)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=BLACK)
    x0 = left + (plot_w - group_w * len(groups)) // 2
    for g, name in enumerate(groups):
        gx = x0 + g * group_w + 13
        for s in range(len(series)):
            v = values[s, g]
            if not np.isfinite(v):
                continue
            x = gx + s * bar
            draw.rectangle([x, min(y_of(v), y_of(0)), x + bar - 3, max(y_of(v), y_of(0))],
                           fill=SERIES_COLOURS[s % len(SERIES_COLOURS)])
            text(img, (x + (bar - 3) // 2, y_of(v) - 3 if v >= 0 else y_of(v) + 3), fmt.format(v), 10,
                 "mb" if v >= 0 else "mt", angle=90 if len(series) > 1 or len(fmt.format(v)) > 5 else 0)
        text(img, (gx + (group_w - 26) // 2, top + plot_h + 6), name, 13, "mt", angle=90 if rotate else 0)
    text(img, (left + plot_w // 2, height - 8), xlabel, 14, "mb")
    text(img, (14, top + plot_h // 2), ylabel, 14, "lm", angle=90)
    for s, label in enumerate(series):  # legend
        y = top + 10 + s * 22
        swatch = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        draw.rectangle([left + plot_w + 16, y, left + plot_w + 30, y + 14], fill=swatch)
        text(img, (left + plot_w + 36, y + 7), label, 13, "lm")
    return img


def line_chart(series: dict, colours: dict, title: str, xlabel: str, ylabel: str, size: tuple,
               xlim: tuple, ylim: Optional[tuple] = None, show_legend: bool = True,
               smoothed: bool = True, tapered: bool = False) -> Image.Image:
    """Lines over a shared x axis: series {name: (xs, ys)}, each drawn raw (faint) and smoothed
    (full colour, `smooth`), or only raw in full colour when not `smoothed` (an exact curve such as
    the learning rate), with grid, ticks, labelled axes and a legend of the names. `tapered`: each
    line narrower than the one before, so lines lying on one another all show. Values below 1e-2
    or from 1e5 up are written as multiples of a power of ten, named in the y label."""
    width, height = size
    legend_w = max(text_size(n, 13)[0] for n in series) + 48 if show_legend and series else 12
    left, top, right, bottom = 74, 34, width - legend_w, height - 44
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 16), title, 15)
    ys = [y for _, values in series.values() for y in values]
    lo, hi = ylim or (min(ys, default=0.0), max(ys, default=1.0))
    if hi - lo <= 1e-12 * max(abs(hi), 1e-30):  # a flat line still needs a y range
        lo, hi = lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    yticks, xticks = nice_ticks(lo, hi, 4), nice_ticks(*xlim, 6)
    (lo, hi), (x0, x1) = (yticks[0], yticks[-1]), (xticks[0], xticks[-1])
    top_value = max(abs(lo), abs(hi))
    power = math.floor(math.log10(top_value)) if top_value and not 1e-2 <= top_value < 1e5 else 0
    X = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    Y = lambda y: bottom - (y - lo) / (hi - lo) * (bottom - top)
    for v in yticks:
        draw.line([(left, Y(v)), (right, Y(v))], fill=LIGHT)
        text(img, (left - 6, Y(v)), tick_label(v / 10 ** power, (yticks[1] - yticks[0]) / 10 ** power), 12, "rm")
    for v in xticks:
        draw.line([(X(v), top), (X(v), bottom)], fill=LIGHT)
        text(img, (X(v), bottom + 5), tick_label(v, xticks[1] - xticks[0]), 12, "mt")
    draw.rectangle([left, top, right, bottom], outline=BLACK)
    text(img, ((left + right) // 2, height - 6), xlabel, 13, "mb")
    text(img, (10, (top + bottom) // 2), ylabel + (f" (x 1e{power})" if power else ""), 13, "lm", angle=90)
    for k, (name, (xs, values)) in enumerate(series.items()):
        c, width = colours[name], max(2, 10 - 2 * k) if tapered else 2
        faint = tuple(round(255 - 0.35 * (255 - v)) for v in c)
        for line, fill, w in ((values, faint, 1), (smooth(values), c, width)) if smoothed else ((values, c, width),):
            points = [(X(x), Y(y)) for x, y in zip(xs, line)]
            if len(points) == 1:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=fill)
            else:
                draw.line(points, fill=fill, width=w, joint="curve")
    for k, name in enumerate(series if show_legend else []):
        y = top + 10 + 20 * k
        draw.line([(right + 12, y), (right + 32, y)], fill=colours[name], width=3)
        text(img, (right + 38, y), name, 13, "lm")
    return img


def smooth(values: list) -> list:
    """An exponential moving average over about a fifteenth of the points, debiased at the start
    (as TensorBoard's smoothing); fewer than 30 points stay as they are."""
    weight = 1 - 2 / (max(1, len(values) // 15) + 1)
    out, average = [], 0.0
    for k, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** k))
    return out


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the tick step needs (0.25 steps: two; 0.005: three)."""
    decimals = next(d for d in range(10) if abs(round(step, d) - step) <= 1e-9 * step)
    return f"{v:.{decimals}f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def scatter(points, tasks: list, title: str, size: int = 340) -> Image.Image:
    """2-D points coloured by task in a framed square, axes named t-SNE 1 and t-SNE 2."""
    img = Image.new("RGB", (size + 60, size + 80), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, ((size + 60) // 2, 18), title, 15)
    left, top = 40, 38
    draw.rectangle([left, top, left + size, top + size], outline=BLACK)
    text(img, (left + size // 2, top + size + 8), "t-SNE 1", 13, "mt")
    text(img, (14, top + size // 2), "t-SNE 2", 13, "lm", angle=90)
    if points is None:
        text(img, (left + size // 2, top + size // 2), "too few samples", 13, fill=GREY)
        return img
    p = np.asarray(points, dtype=float)
    p = (p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-12)  # [0, 1]^2
    for (x, y), t in zip(p, tasks):
        marker(draw, left + 8 + x * (size - 16), top + 8 + (1 - y) * (size - 16), t)
    return img


def marker(draw: ImageDraw.ImageDraw, x: float, y: float, task: str, r: int = 5) -> None:
    """A task's colour and shape, outlined in white: refer and identify share images, so their points
    can coincide before the connector; the shapes keep both visible."""
    shape = {"vqa": "circle", "refer": "square", "identify": "triangle", "caption": "diamond",
             "cls": "circle", "qa": "square"}[task]
    style = dict(fill=TASK_COLOURS[task], outline=WHITE)
    if shape == "circle":
        draw.ellipse([x - r + 1, y - r + 1, x + r - 1, y + r - 1], **style)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], **style)
    else:
        sides = 3 if shape == "triangle" else 4
        draw.regular_polygon((x, y, r + 1), sides, rotation=0 if sides == 3 else 45, **style)


def legend(tasks: list) -> Image.Image:
    img = Image.new("RGB", (max([text_size(t, 14)[0] for t in tasks] + [40]) + 50, 30 + 24 * len(tasks)), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (10, 12), "task", 14, "lm")
    for k, t in enumerate(tasks):
        y = 34 + 24 * k
        marker(draw, 18, y, t, r=6)
        text(img, (32, y), t, 14, "lm")
    return img


def stack(images: list, horizontal: bool, title: Optional[str] = None, gap: int = 12) -> Image.Image:
    """Panels side by side (or one above the other), centred, with an optional title above."""
    title_h = 40 if title else 0
    if horizontal:
        w, h = sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)
    else:
        w, h = max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)
    w = max(w, text_size(title, 19)[0] + 40) if title else w
    out = Image.new("RGB", (w, h + title_h), WHITE)
    if title:
        text(out, (w // 2, 22), title, 19)
    pos = 0
    for i in images:
        out.paste(i, (pos, title_h + (h - i.height) // 2) if horizontal else ((w - i.width) // 2, title_h + pos))
        pos += (i.width if horizontal else i.height) + gap
    return out


# -------------------------------------------------------------------------------------------------
# The figures

def figure2(runs: list, level: str) -> Image.Image:
    """Figure 2: GD (Eq. 2) and GM (Eq. 3) between datasets (or tasks), one row per checkpoint."""
    rows, what = [], "dataset" if level == "by_dataset" else "task"
    for r in runs:
        c = r[level]
        gd = np.asarray(c["gd"], dtype=float)  # None (from JSON) -> nan
        reach = max([1.0] + [abs(v) for v in gd.flatten() if np.isfinite(v)])  # symmetric scale, at least +-1
        rows.append(stack([
            heatmap(gd, c["labels"], c["labels"], f"{r['label']}: gradient direction GD (Eq. 2)", DIVERGING,
                    -reach, reach, f"j: {what} whose normalised step is taken", f"i: {what} whose loss changes",
                    "GD_ij"),
            heatmap(c["gm"], c["labels"], c["labels"], f"{r['label']}: gradient magnitude GM (Eq. 3)", VIRIDIS,
                    0.0, 1.0, what, what, "GM_ij")], horizontal=True))
    return stack(rows, horizontal=False, title=f"Gradient conflict between {what}s at the {runs[0]['target']} "
                                               f"(Figure 2)")


def figure4a(runs: list) -> Image.Image:
    tasks = [t for t in TASKS if any(t in r["by_task"]["labels"] for r in runs)]
    series = {r["label"]: [r["index_normalised"].get(t) for t in tasks] for r in runs}  # None: not in that run
    return bar_chart(tasks, series, "Tug-of-war index per task (Eq. 4, max-normalised; Figure 4a)",
                     "sum_j GD_ij GM_ij / max", "task")


def figure4b(runs: list) -> Image.Image:
    bins = [f"{k / BINS:.1f}-{(k + 1) / BINS:.1f}" for k in range(BINS)]
    series = {r["label"]: r["statistics_score"]["fraction"] for r in runs}
    return bar_chart(bins, series, f"Statistics score of the {runs[0]['target']} parameters "
                                   f"(Eq. 5; Figure 4b)", "fraction of parameters", "statistics score interval")


def figure4c(runs: list) -> Image.Image:
    panels = []
    for r in [r for r in runs if r["routing"] is not None]:
        tasks, weights = list(r["routing"]["tasks"]), np.array(list(r["routing"]["tasks"].values()))
        names, per_dataset = list(r["routing"]["datasets"]), np.array(list(r["routing"]["datasets"].values()))
        experts = [f"E{k + 1}" for k in range(weights.shape[1])]
        top = float(max(weights.max(), per_dataset.max()))
        panels.append(stack([
            heatmap(weights, tasks, experts, f"{r['label']}: per task", VIRIDIS, 0.0, top, "expert", "task",
                    "mean routing weight", cell=54),
            heatmap(per_dataset, names, experts, f"{r['label']}: per dataset", VIRIDIS, 0.0, top, "expert",
                    "dataset", "mean routing weight", cell=40)], horizontal=True))
    return stack(panels, horizontal=False, title="Routing weights of the connector experts (Figure 4c)")


def figure5(runs: list) -> Image.Image:
    rows = [stack([scatter(r["tsne"][side], r["tsne"]["tasks"], f"{r['label']}: {side} the connector")
                   for side in ("before", "after")], horizontal=True) for r in runs]
    tasks = [t for t in TASKS if any(t in r["tsne"]["tasks"] for r in runs)]
    return stack([stack(rows, horizontal=False), legend(tasks)], horizontal=True,
                 title="t-SNE of visual features, mean-pooled over tokens (Figure 5)")


# -------------------------------------------------------------------------------------------------
# Training curves: train.py's JSONL log as one picture (python train.py --plot ckpt.jsonl)

def training_records(path: str) -> list:
    """The records of a training log, one per step in step order. A run resumed from a checkpoint
    older than its log logs some steps again; the later record of a step wins, so the curves of a
    resumed run are one continuous line."""
    by_step = {}
    for n, record in read_jsonl(path, "training log"):
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise ValueError(f"{path}, row {n}: a record needs an integer 'step'")
        for key in ("task_loss", "routing"):
            unknown = set(record.get(key, {})) - set(TASKS)
            if unknown:
                raise ValueError(f"{path}, row {n}: '{key}' names unknown tasks {sorted(unknown)}")
        by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def training_series(records: list) -> dict:
    """The curves of a log: loss per task, learning rate, gradient norm, and each image task's mean
    routing weight per expert, each as (steps, values) over the records that have it."""
    def series(pick) -> tuple:
        pairs = [(r["step"], float(v)) for r in records for v in [pick(r)] if v is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]
    routed = {t: len(r["routing"][t]) for r in records for t in r.get("routing", {})}
    return {"loss": {t: series(lambda r: r.get("task_loss", {}).get(t)) for t in TASKS
                     if any(t in r.get("task_loss", {}) for r in records)},
            "lr": series(lambda r: r.get("lr")), "grad_norm": series(lambda r: r.get("grad_norm")),
            "routing": {t: {f"E{k + 1}": series(lambda r: r.get("routing", {}).get(t, [None] * routed[t])[k])
                            for k in range(routed[t])} for t in TASKS if t in routed}}


def training_figure(curves: dict, title: str, width: int = 900) -> Image.Image:
    """Loss per task; learning rate and gradient norm; the routing weights of each image task's
    experts over the steps (how the router specialises; Figure 4c shows two snapshots of it)."""
    steps = [s for xs, _ in [curves["lr"], curves["grad_norm"], *curves["loss"].values()] for s in xs]
    xlim = (min(steps), max(steps) + (min(steps) == max(steps)))
    half, third = (width - 12) // 2, (width - 24) // 3
    x = "optimizer step"
    rows = [line_chart(curves["loss"], TASK_COLOURS, "Training loss per task (thin: logged, thick: smoothed)", x,
                       "cross-entropy per answer token (nats)", (width, 330), xlim),
            stack([line_chart({"lr": curves["lr"]}, {"lr": SERIES_COLOURS[0]}, "Learning rate", x,
                              "learning rate", (half, 250), xlim, show_legend=False, smoothed=False),
                   line_chart({"norm": curves["grad_norm"]}, {"norm": SERIES_COLOURS[1]},
                              "Gradient norm of the trainable weights", x, "L2 norm", (half, 250), xlim,
                              show_legend=False)], horizontal=True)]
    if curves["routing"]:
        experts = list(next(iter(curves["routing"].values())))
        colours = {e: SERIES_COLOURS[k % len(SERIES_COLOURS)] for k, e in enumerate(experts)}
        panels = [line_chart(weights, colours, f"{task}: routing weights", x, "mean weight", (third, 240), xlim,
                             (0.0, 1.0), show_legend=False, tapered=True) for task, weights in curves["routing"].items()]
        key = Image.new("RGB", (width, 26), WHITE)
        text(key, (8, 13), "experts:", 13, "lm")
        for k, e in enumerate(experts):
            ImageDraw.Draw(key).line([(80 + 64 * k, 13), (100 + 64 * k, 13)], fill=colours[e], width=3)
            text(key, (106 + 64 * k, 13), e, 13, "lm")
        rows.append(stack([key] + [stack(panels[i:i + 3], horizontal=True) for i in range(0, len(panels), 3)],
                          horizontal=False, title="Mean routing weight of each connector expert, per task"))
    return stack(rows, horizontal=False, title=title)


def plot_training(log_path: str, png_path: Optional[str] = None) -> tuple[str, dict]:
    """Draw a training log (default PNG: the log's path with .png) -> (PNG path, the curves drawn)."""
    records = training_records(log_path)
    curves = training_series(records)
    png_path = png_path or os.path.splitext(log_path)[0] + ".png"
    title = f"Training curves of {os.path.basename(log_path)}: steps {records[0]['step']}-{records[-1]['step']}"
    save_png(training_figure(curves, title), png_path)
    return png_path, curves


def save_png(img: Image.Image, path: str) -> None:
    img.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def report(runs: list, out_dir: str) -> dict:
    """analysis.json and the figures for one or more analysed models (Figure 4 compares them)."""
    os.makedirs(out_dir, exist_ok=True)
    # Section 4.3: the task indexes of every compared model divided by the largest of them all
    top = max((abs(v) for r in runs for v in r["by_task"]["index"] if v is not None and math.isfinite(v)),
              default=1.0)
    for r in runs:
        r["index_normalised"] = {t: None if v is None else v / top
                                 for t, v in zip(r["by_task"]["labels"], r["by_task"]["index"])}
    figures = {"fig2_gradient_conflict_datasets.png": figure2(runs, "by_dataset"),
               "fig2_gradient_conflict_tasks.png": figure2(runs, "by_task"),
               "fig4a_tug_of_war_index.png": figure4a(runs),
               "fig4b_statistics_score.png": figure4b(runs),
               "fig5_tsne.png": figure5(runs)}
    if any(r["routing"] is not None for r in runs):
        figures["fig4c_routing_weights.png"] = figure4c(runs)
    for name, img in figures.items():
        save_png(img, os.path.join(out_dir, name))
    result = {"format": "unimed-analysis", "runs": runs,
              "figures": {name: list(img.size) for name, img in sorted(figures.items())}}
    write_json(os.path.join(out_dir, "analysis.json"), result, indent=1)
    print(f"analysis: {os.path.join(out_dir, 'analysis.json')} and {len(figures)} figures in {out_dir}")
    return result


def load_runs(source) -> list:
    """An earlier result (the dict run() returns, or the path of its analysis.json) -> its runs."""
    if source is None:
        return []
    if isinstance(source, str):
        path, source = source, read_json(source, "analysis.json")
        if not isinstance(source, dict) or source.get("format") != "unimed-analysis":
            raise ValueError(f"{path}: not an analysis.json (no 'format': 'unimed-analysis')")
    return list(source["runs"])


def run(model, datasets: dict, out_dir: str, config: Optional[AnalysisConfig] = None, label: str = "model",
        baseline=None) -> dict:
    """Analyse `model` on `datasets` and write analysis.json and the figures into `out_dir`;
    `baseline` (an earlier result or its analysis.json path) is drawn before it. Returns the JSON."""
    runs = load_runs(baseline) + [analyse(model, datasets, config or AnalysisConfig(), label)]
    return report(runs, out_dir)


# -------------------------------------------------------------------------------------------------
# Command line: checkpoints are loaded by model.UniMed.from_checkpoint (the one place that knows the format)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="checkpoints (ckpt.pt, or an official checkpoint_N.pth) and/or "
                                             "analysis.json files of earlier runs, drawn in this order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--labels", help="comma-separated names of the inputs in the figures (default: file names)")
    p.add_argument("--data-root", help="dataset root (default: the one recorded in each checkpoint)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every one found)")
    p.add_argument("--batches", type=int, default=100, help="sampled batches per dataset (paper 100)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per batch (default 4, as in training)")
    p.add_argument("--target", choices=("connector", "lora"), default="connector",
                   help="take gradients at the connector (the paper) or at the LoRA weights")
    p.add_argument("--samples-per-task", type=int, default=200, help="t-SNE points per task (paper 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama", help="HF LLaMA-2 directory (default: the one recorded in the checkpoint)")
    p.add_argument("--vit", help="EVA ViT-g .safetensors (default: the one recorded in the checkpoint)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else default_labels(args.inputs)
    if len(labels) != len(args.inputs):
        sys.exit(f"error: --labels names {len(labels)} inputs, but {len(args.inputs)} were given")
    try:
        config = AnalysisConfig(batches=args.batches, batch_size=args.batch_size, target=args.target,
                                samples_per_task=args.samples_per_task, seed=args.seed)
        runs = []
        for path, label in zip(args.inputs, labels):
            if path.endswith(".json"):  # an earlier run keeps its saved label unless --labels renames it
                runs += [{**r, "label": label} if label else r for r in load_runs(path)]
            else:
                runs.append(analyse_checkpoint(path, label, config, args))
        report(runs, args.out)
    except (ValueError, OSError) as e:  # bad input: the file, key or flag at fault is named in e
        sys.exit(f"error: {e}")


def default_labels(paths: list) -> list:
    """Checkpoints: file names without extension, or parent/name where two share a name (a/ckpt.pt,
    b/ckpt.pt). Earlier runs (.json) keep the labels they were saved with (None)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) < len(stems):
        stems = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), s) for p, s in zip(paths, stems)]
    return [None if p.endswith(".json") else s for p, s in zip(paths, stems)]


def analyse_checkpoint(path: str, label: str, config: AnalysisConfig, args) -> dict:
    """Load one checkpoint (model.UniMed.from_checkpoint), analyse it, free it (so two fit one after
    the other)."""
    ckpt = read_checkpoint(path)
    root = checkpoint_data_root(ckpt, path, args.data_root)
    names = args.datasets.split(",") if args.datasets else None
    datasets = data.load_datasets(root, "train", names=names, train=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = UniMed.from_checkpoint(path, args.llama, args.vit, device, ckpt=ckpt)
    result = analyse(model, datasets, config, label)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    main()
