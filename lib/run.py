"""Around the training loop: stopping cleanly on a signal or a NaN, and the JSONL log of a run.

train.py's loop reads `stop["requested"]` after each step (Ctrl-C or SIGTERM set it; a second
Ctrl-C aborts), reads the steps' losses back (`read_back`) on log and save steps, and writes one
`log_record` every --log-every steps to the log `open_log` gives.
"""
import contextlib
import math
import os
import signal
import threading

import torch
import torch.distributed as dist
from tqdm import tqdm

from lib.files import read_log, write_jsonl


@contextlib.contextmanager
def stop_signals(announce: bool):
    """Ctrl-C / SIGTERM set a flag that the loop reads after each step; a second Ctrl-C aborts."""
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if announce:
            tqdm.write("stopping after this step (Ctrl-C again to abort without saving)")
    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank if it is True on any (so that all processes stop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return bool(t > 0)


class Stop(Exception):
    """Raised to end the run early with a message (NaN loss)."""


def read_back(window: list, out: str) -> None:
    """The losses and gradient norms of the window's steps (dicts), still device tensors, to the host
    in one read: a read waits for the device, so the loop reads only on log and save steps. A
    non-finite one stops the run before it saves: `out` keeps the last good checkpoint."""
    fresh = [s for s in window if torch.is_tensor(s["loss"])]
    if not fresh:
        return
    values = torch.stack([torch.stack((s["loss"], s["grad_norm"])) for s in fresh]).tolist()
    for s, (loss, norm) in zip(fresh, values):
        s["loss"], s["grad_norm"] = loss, norm
        for what, value in (("loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                raise Stop(f"{what} is {value} at step {s['step']} (task {s['task']!r}, dataset {s['dataset']!r}); "
                           f"stopping without saving, {out} keeps the last good checkpoint")


@contextlib.contextmanager
def open_log(path: str, resume_step, enabled: bool):
    """The JSONL log (None where not `enabled`: ranks > 0). A new run starts a new log; a resumed one
    appends after cutting the steps past its checkpoint (`resume_step`), which it logs again."""
    if not enabled:
        yield None
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is not None:
        records = read_log(path)  # a line torn by the kill is cut too
        kept = [r for r in records if r["step"] <= resume_step]
        if len(kept) < len(records):
            write_jsonl(path, kept)
    with open(path, "w" if resume_step is None else "a") as log:
        yield log


def log_record(window: list, step: int, lr: float, grad_norm: float, device) -> dict:
    """One log line from the steps since the last (dicts of task, loss, tokens, seconds, routing): the
    mean loss, also per task, tokens/s, peak memory, and each task's mean routing weights."""
    tasks = sorted({s["task"] for s in window})

    def per_task(key) -> dict:
        return {t: [s[key] for s in window if s["task"] == t and s[key] is not None] for t in tasks}
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource  # peak resident memory of the process (kilobytes on Linux)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step": step, "loss": round(sum(s["loss"] for s in window) / len(window), 5),
            "task_loss": {t: round(sum(v) / len(v), 5) for t, v in per_task("loss").items()},
            "lr": lr, "grad_norm": round(grad_norm, 5),
            "tokens_per_s": round(sum(s["tokens"] for s in window) / sum(s["seconds"] for s in window), 1),
            "peak_mem_gb": round(peak_gb, 3),
            "routing": {t: [round(x, 4) for x in torch.stack(v).mean(0).tolist()]
                        for t, v in per_task("routing").items() if v}}
