"""What --low-memory changes in training: the demo trained with and without it, same seed, side by side.

    python bench/low_memory_numerics.py                   # 300 steps of the demo, seed 42 (~5 min on 2 cores)
    python bench/low_memory_numerics.py --iters 3000

Five runs of train.py on the built-in demo, one thread each, every step logged: the standard AdamW;
--low-memory; --low-memory with fp32 moments (lib/optim.py's state_dtype, not a flag: stepping in
the backward alone, which must change nothing); --low-memory in chunks of 2^19 elements (not a flag
either: the demo's largest Linear, the router's first layer, 2.4M weights, is then split as the
paper's 508M one is by the default 2^22); and the standard AdamW on two threads, whose sums round
otherwise: the yardstick of how far any change of rounding carries a run. It prints the loss at
some steps, the largest loss and gradient-norm differences against the standard run, and how far
the final trainable weights lie from the standard run's. Runs finished in --out are not repeated.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py with lib/optim.py's AdamWInBackward given other options (not flags of train.py)
PATCHED = ("import functools, sys, torch, train; train.AdamWInBackward = functools.partial("
           "train.AdamWInBackward, **{opts}); train.main(sys.argv[1:])")
RUNS = {  # name: flags, AdamWInBackward's options, threads
    "standard": ([], None, 1),
    "--low-memory": (["--low-memory"], None, 1),
    "--low-memory, fp32 moments": (["--low-memory"], "dict(state_dtype=torch.float32)", 1),
    "--low-memory, chunks of 2^19": (["--low-memory"], "dict(chunk=2**19)", 1),
    "standard, 2 threads": ([], None, 2),
}


def train(name: str, args) -> tuple[dict, list]:
    flags, opts, threads = RUNS[name]
    out = os.path.join(args.out, name.replace("--", "").replace(", ", "_").replace(" ", "_").replace("^", "") + ".pt")
    if not os.path.exists(out):
        program = [os.path.join(ROOT, "train.py")] if opts is None else ["-c", PATCHED.format(opts=opts)]
        subprocess.run([sys.executable, *program, *flags, "--iters", str(args.iters), "--seed", str(args.seed),
                        "--log-every", "1", "--save-every", "0", "--out", out], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    log = [json.loads(line) for line in open(out[:-3] + ".jsonl")]
    return torch.load(out, map_location="cpu", weights_only=True)["model"], log


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "low_memory"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = {name: train(name, args) for name in RUNS}
    weights, log = runs["standard"]
    shown = sorted({1, 2, 10} | set(range(args.iters // 6, args.iters + 1, args.iters // 6)))
    print(f"demo, seed {args.seed}, {args.iters} steps: loss at step " + ", ".join(map(str, shown)))
    for name, (w, lg) in runs.items():
        print(f"  {name:30} " + " ".join(f"{lg[s - 1]['loss']:.4f}" for s in shown))
    scale = torch.cat([t.flatten() for t in weights.values()])
    print(f"\nagainst the standard run (final trainable weights: {scale.numel():,}, max |w| {scale.abs().max():.3g}, "
          f"rms {scale.square().mean().sqrt():.3g})")
    print("| run | steps with the same loss | max abs loss diff | mean abs loss diff, last 50 steps | "
          "max rel grad-norm diff | weights max abs diff | max abs diff / max abs weight | ||diff|| / ||w|| |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (w, lg) in list(runs.items())[1:]:
        loss_diff = [abs(a["loss"] - b["loss"]) for a, b in zip(log, lg)]
        same = next((i for i, d in enumerate(loss_diff) if d > 0), len(loss_diff))
        gn = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(log, lg))
        diff = torch.cat([(w[k] - weights[k]).flatten() for k in weights])
        print(f"| {name} | {same} | {max(loss_diff):.4f} | {sum(loss_diff[-50:]) / 50:.4f} | {gn:.2e} | "
              f"{diff.abs().max():.3g} | {diff.abs().max() / scale.abs().max():.3g} | "
              f"{diff.norm() / scale.norm():.3g} |")


if __name__ == "__main__":
    main()
