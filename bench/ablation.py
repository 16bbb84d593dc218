"""The paper's Table 2(a) in miniature: the demo trained with each connector and router, over seeds.

    python bench/ablation.py                          # 6 configurations x 3 seeds (see the README)
    python bench/ablation.py --seeds 0 --iters 300    # a quick look

Each run is what a user runs: `train.py` on the built-in demo with one flag changed (same steps,
same data, seeds 0, 1, 2 by default), then `evaluate.py` on the test split. Then the tug-of-war index
(Eq. 4, workshop/analysis.py) of the trained connector, per task, from --batches sampled training batches per
dataset. It prints, per configuration, each dataset's Table 2 metric as mean (min-max) over the
seeds, the paper's "total delta" against the MLP connector, and the mean tug-of-war index.

Table 2's metrics: VQA and REG BLEU-1, REC IoU, report BLEU-1, classification accuracy. The total
delta is the sum over datasets of each metric's change relative to the MLP connector, in percent
(the paper's +8.0% for the soft router). The tug-of-war index of a task is sum_j GD_ij GM_ij: the
higher, the more the other tasks' gradients at the connector pull the way this task's do.

Everything goes to --out (default ablation/): per run its checkpoint, log and eval folder, and
ablation.json with every number. Runs already finished there are not repeated, so a stopped
ablation continues where it stopped.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from workshop import analysis  # noqa: E402
import data  # noqa: E402
from lib.files import read_json, write_json  # noqa: E402
from lib.checkpoint import checkpoint_data_root, read_checkpoint  # noqa: E402
from model import UniMed  # noqa: E402
from train import SCHEDULES  # noqa: E402

CONFIGS = {  # Table 2(a): one connector, then Connector-MoE (5 experts) with each router as the paper ran it
    "linear": ["--connector", "linear"],
    "mlp": ["--connector", "mlp"],
    "constant": ["--router", "constant"],
    "hard": ["--router", "hard"],
    "sparse": ["--router", "sparse", "--router-input", "token"],
    "soft": ["--router", "soft"],  # on token & task token, the main model
}
TABLE2_METRIC = {"vqa": "bleu1", "refer": "iou", "identify": "bleu1", "caption": "bleu1", "cls": "acc"}


def run_one(name: str, seed: int, args) -> dict:
    """Train and evaluate one configuration with one seed (as the user would), then measure its
    tug-of-war index; the result is kept in OUT/name_seed/run.json."""
    folder = os.path.join(args.out, f"{name}_seed{seed}")
    done = os.path.join(folder, "run.json")
    if os.path.exists(done):
        return read_json(done, "an ablation run")
    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, "ckpt.pt")
    python = [sys.executable]
    t0 = time.time()
    if not os.path.exists(ckpt):
        subprocess.run(python + [os.path.join(ROOT, "train.py"), *CONFIGS[name], "--seed", str(seed),
                                 "--iters", str(args.iters), "--out", ckpt], cwd=ROOT, check=True)
    t1 = time.time()
    subprocess.run(python + [os.path.join(ROOT, "evaluate.py"), ckpt, "--out", os.path.join(folder, "eval")],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = read_json(os.path.join(folder, "eval", "results.json"), "results.json")
    scores = {n: r["metrics"][TABLE2_METRIC[r["task"]]] for n, r in results["datasets"].items()
              if r["task"] in TABLE2_METRIC}
    result = {"config": name, "seed": seed, "iters": args.iters, "scores": scores,
              "tug_of_war": tug_of_war_index(ckpt, args.batches), "train_s": t1 - t0}
    write_json(done, result)
    return result


def tug_of_war_index(ckpt_path: str, batches: int) -> dict:
    """Eq. 4 per task at the connector, from `batches` sampled training batches per image dataset."""
    torch.manual_seed(0)
    model = UniMed.from_checkpoint(ckpt_path)
    datasets = data.load_datasets(checkpoint_data_root(read_checkpoint(ckpt_path), ckpt_path), "train", train=False)
    names = [n for n in datasets if data.TASK_OF[n] != "qa"]  # text QA never reaches the connector
    stats = analysis.gradient_statistics(model, datasets, names, analysis.AnalysisConfig(batches=batches))
    dots = [torch.tensor(stats["dots"][n], dtype=torch.float64) for n in names]
    norms = [torch.tensor(stats["norms"][n], dtype=torch.float64) for n in names]
    tasks, task_dots, task_norms = analysis.group_by_task(names, dots, norms)
    gd, gm = analysis.gradient_direction(task_dots), analysis.gradient_magnitude(task_norms)  # Eq. 2, 3
    return dict(zip(tasks, analysis.tug_of_war(gd, gm).tolist()))  # Eq. 4


def summary(runs: list) -> dict:
    """Per configuration: mean, min and max of each score over seeds, total delta vs MLP, mean index."""
    table = {}
    for name in CONFIGS:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        scores = {n: [r["scores"][n] for r in mine] for n in mine[0]["scores"]}
        index = [statistics.mean(r["tug_of_war"].values()) for r in mine]
        table[name] = {"seeds": [r["seed"] for r in mine],
                       "scores": {n: (statistics.mean(v), min(v), max(v)) for n, v in scores.items()},
                       "tug_of_war": (statistics.mean(index), min(index), max(index))}
    if "mlp" in table:
        base = {n: s[0] for n, s in table["mlp"]["scores"].items()}
        for row in table.values():  # the paper's total: the sum of relative changes, in percent
            row["total_delta"] = sum(100.0 * (s[0] - base[n]) / base[n] for n, s in row["scores"].items()
                                     if base.get(n))
    return table


def print_table(table: dict) -> None:
    names = list(next(iter(table.values()))["scores"])
    print("| dataset (metric) | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for n in names:
        metric = TABLE2_METRIC[data.TASK_OF[n]]
        cells = [f"{row['scores'][n][0]:.1f} ({row['scores'][n][1]:.0f}-{row['scores'][n][2]:.0f})"
                 for row in table.values()]
        print(f"| {n} ({metric}) | " + " | ".join(cells) + " |")
    if all("total_delta" in row for row in table.values()):
        print("| total delta vs mlp | " + " | ".join(f"{row['total_delta']:+.1f}%" for row in table.values()) + " |")
    print("| tug-of-war index (mean over tasks) | " + " | ".join(
        f"{row['tug_of_war'][0]:.2f} ({row['tug_of_war'][1]:.2f}-{row['tug_of_war'][2]:.2f})"
        for row in table.values()) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--iters", type=int, default=SCHEDULES["demo"]["iters"],
                   help=f"training steps of every run (default: the demo's {SCHEDULES['demo']['iters']})")
    p.add_argument("--batches", type=int, default=20, help="sampled batches per dataset for the tug-of-war index")
    p.add_argument("--out", default=os.path.join(ROOT, "ablation"), help="output folder (default ablation/)")
    args = p.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"bench/ablation.py: unknown --configs {unknown}; choose from {list(CONFIGS)}")
    runs = [run_one(name, int(seed), args) for seed in args.seeds.split(",") for name in configs]
    table = summary(runs)
    write_json(os.path.join(args.out, "ablation.json"), {"runs": runs, "table": table})
    print(f"\n{len(runs)} runs of {args.iters} steps; every number in {os.path.join(args.out, 'ablation.json')}")
    print_table(table)


if __name__ == "__main__":
    main()
