"""What the demo learns, over many seeds: README command 1 with --seed S, then its evaluation.

    python bench/seeds.py                          # the 10 seeds of docs/demo.md's table (~45 min on 2 cores)
    python bench/seeds.py --seeds 42,7 --jobs 1    # a quick look
    python bench/seeds.py --low-memory             # any further flag goes to train.py

Each run is what a user runs: `python train.py --seed S` on the built-in demo (built once in the
repository root, as command 1 does), then `python evaluate.py`. --jobs runs go at once, each with
cores / jobs threads (on 2 cores the tiny model trains ~11 steps/s on one thread and 13-16 on two,
so two one-thread runs at once finish well before two two-thread runs in turn). It prints each dataset's
headline metric for every seed with its mean, min and max, the chance level, the least lead over
chance, and the margin the README claims (workshop.demo.DEMO_CLAIMS), and exits 1 if any seed fell
short of a claim. Runs already finished under --out are not repeated, so a stopped sweep continues.
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib.files import read_json, write_json  # noqa: E402
from workshop.demo import DEMO_CLAIMS, DEMO_DIR, build_demo  # noqa: E402

SEEDS = ",".join(map(str, range(50, 60)))  # docs/demo.md's table: seeds not used to tune the demo


def start(seed: int, folder: str, threads: int, train_flags: list) -> subprocess.Popen:
    """Train then evaluate one seed in the background; its output goes to folder/run.log."""
    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, "ckpt.pt")
    python = sys.executable
    train = [python, "train.py", "--seed", str(seed), "--out", ckpt, *train_flags]
    evaluate = [python, "evaluate.py", ckpt, "--out", os.path.join(folder, "eval")]
    script = (f"set -e; start=$(date +%s); {shlex.join(train)}; mid=$(date +%s); {shlex.join(evaluate)}; "
              f"echo \"$((mid - start)) $(($(date +%s) - mid))\" > {shlex.quote(os.path.join(folder, 'seconds'))}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(os.path.join(folder, "run.log"), "w") as log:
        return subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def sweep(seeds: list, out: str, jobs: int, train_flags: list) -> dict:
    """{seed: results.json's datasets} for every seed, running at most `jobs` at once."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [s for s in seeds if not os.path.exists(os.path.join(out, f"seed{s}", "eval", "results.json"))]
    running = {}
    while todo or running:
        while todo and len(running) < jobs:
            seed = todo.pop(0)
            print(f"seed {seed}: training and evaluating ({threads} thread(s)), log in {out}/seed{seed}/run.log")
            running[seed] = start(seed, os.path.join(out, f"seed{seed}"), threads, train_flags)
        time.sleep(2)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                if proc.returncode:
                    sys.exit(f"bench/seeds.py: seed {seed} failed (exit {proc.returncode}); see {out}/seed{seed}/run.log")
                train_s, eval_s = open(os.path.join(out, f"seed{seed}", "seconds")).read().split()
                print(f"seed {seed}: done (training {int(train_s) // 60} min {int(train_s) % 60} s, evaluation {eval_s} s)")
    return {s: read_json(os.path.join(out, f"seed{s}", "eval", "results.json"), "results.json")["datasets"]
            for s in seeds}


def table(results: dict) -> tuple[list, list]:
    """Markdown rows (one per claimed dataset) and the (dataset, seed, score) that missed a claim."""
    seeds = list(results)
    rows = ["| dataset | metric | " + " | ".join(f"seed {s}" for s in seeds) +
            " | mean | min | max | chance | min - chance | claimed |",
            "|---" * (len(seeds) + 8) + "|"]
    missed = []
    for name, (metric, chance, margin, _) in DEMO_CLAIMS.items():
        scores = [results[s][name]["metrics"][metric] for s in seeds]
        missed += [(name, s, x) for s, x in zip(seeds, scores) if not x > chance + margin]
        cells = [f"{x:.1f}" for x in scores] + [f"{statistics.mean(scores):.1f}", f"{min(scores):.1f}",
                                                 f"{max(scores):.1f}", f"{chance:.1f}", f"{min(scores) - chance:+.1f}",
                                                 f"+{margin:g}"]
        rows.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return rows, missed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other flags go to train.py.")
    p.add_argument("--seeds", default=SEEDS, help=f"comma-separated training seeds (default {SEEDS})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--out", default=os.path.join(ROOT, "seeds"), help="output folder (default seeds/)")
    args, train_flags = p.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not os.path.isdir(os.path.join(ROOT, DEMO_DIR)):  # built once here, not by two runs at once
        cwd = os.getcwd()
        os.chdir(ROOT)
        build_demo()
        os.chdir(cwd)
    results = sweep(seeds, args.out, args.jobs, train_flags)
    rows, missed = table(results)
    write_json(os.path.join(args.out, "seeds.json"), {"train_flags": train_flags, "results": results})
    print(f"\n{len(seeds)} seeds of README command 1" + (f" with {' '.join(train_flags)}" if train_flags else "") +
          f"; every number in {os.path.join(args.out, 'seeds.json')}")
    print("\n".join(rows))
    for name, seed, score in missed:
        print(f"MISSED: {name} seed {seed}: {score:.1f} is not above chance + the claimed margin")
    if not missed:
        print(f"Every claimed margin held on all {len(seeds)} seeds.")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
