"""Training curves: a train.py log (ckpt.jsonl) drawn as one picture.

    python -m workshop.curves ckpt.jsonl             # -> ckpt.png; also on a run still going

Loss per task (thin: each logged window's mean, thick: smoothed), the learning rate, the gradient
norm, and for each image task the mean routing weight of every connector expert over the steps: the
paper's Figure 4c as it forms. A resumed run is one continuous curve.
"""
import argparse
import os
import sys
from typing import Optional

from PIL import Image, ImageDraw

from cmoe import IMAGE_TASKS
from lib.files import read_jsonl
from workshop.plot import SERIES_COLOURS, TASK_COLOURS, WHITE, line_chart, save_png, stack, text

TASKS = IMAGE_TASKS + ("qa",)  # display order

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



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", help="a training log, e.g. ckpt.jsonl")
    p.add_argument("--out", help="the picture (default: the log's path with .png)")
    args = p.parse_args(argv)
    try:
        print(f"curves: {plot_training(args.log, args.out)[0]}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
