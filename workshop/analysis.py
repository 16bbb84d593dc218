"""The tug-of-war analysis (paper Sections 3.1.1 and 4.3; Figures 2, 4 and 5), on any checkpoints.

Why does a mixture of connector experts help? Because the tasks pull one shared connector in
different directions. This measures that pull on sampled training batches and draws the pictures:

  GD     Eq. 1-2: how a normalised step on task j changes task i's loss, relative to task i's own step
  GM     Eq. 3: similarity of the tasks' mean gradient magnitudes
  index  Eq. 4: sum_j GD_ij GM_ij, max-normalised over the compared checkpoints (Figure 4a)
  score  Eq. 5: |sum_t g_t| / sum_t |g_t| per parameter, as a histogram (Figure 4b)
  routing the mean weight of each expert per task and dataset (Figure 4c)
  t-SNE  visual features before and after the connector, coloured by task (Figure 5)

    python -m workshop.analysis mlp.pt cmoe.pt --out analysis/      # Figure 4: two side by side
    python -m workshop.analysis OUT/analysis.json cmoe.pt --out B    # reuse an earlier run's numbers

Memory: Eq. 2 needs each batch's gradient dotted with every task's mean normalised gradient, known
only after all batches, so the batches run twice (dropout off); the per-dataset and per-task means
are kept in bf16 on the model's device: (datasets + tasks) x parameters x 2 bytes.
"""
import argparse
import contextlib
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from itertools import zip_longest
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
from cmoe import IMAGE_TASKS, resample
from lib.files import read_json, write_json
from lora import lora_layers
from lib.checkpoint import checkpoint_data_root, read_checkpoint
from model import UniMed
from workshop.plot import DIVERGING, VIRIDIS, bar_chart, heatmap, legend, save_png, scatter, stack

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
    loss, routing, _ = model(images, batch.instructions, batch.answers, batch.task)  # autocasts itself
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
