"""What each lever of --low-memory saves, from the memory planner (fake tensors: no GPU, no weights).

    python bench/memory_levers.py [train.py's flags]     # the paper's configuration by default (~2 min)

The flags' training (batch 4 x (64 + 128) tokens, bf16 base, checkpointed LLaMA) planned at its
steady state (workshop/plan.py) with the optimizer built up one lever at a time: torch's AdamW,
then lib/optim.py's AdamWInBackward with each lever added in turn, then --low-memory's chunk size
varied. Each row prints the peak, where it falls, and the saving against the row above.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.optim import AdamWInBackward  # noqa: E402
from model import LlamaConfig  # noqa: E402
from train import make_optimizer, parse_args, unimed_config  # noqa: E402
from workshop import plan as planner  # noqa: E402


def torch_adamw(foreach: bool):
    def make(model, lr, betas, low_memory=False):
        optimizer = make_optimizer(model, lr, betas)
        for group in optimizer.param_groups:
            group["foreach"] = foreach
        return optimizer
    return make


def in_backward(**options):
    def make(model, lr, betas, low_memory=False):
        groups = make_optimizer(model, lr, betas).param_groups  # train.py's groups (a throwaway AdamW)
        return AdamWInBackward(model, [{k: g[k] for k in ("params", "weight_decay")} for g in groups],
                               lr=lr, betas=betas, **options)
    return make


LEVERS = [
    ("torch AdamW, multi-tensor (foreach: train.py's default on CUDA)", torch_adamw(True)),
    ("torch AdamW, one tensor at a time (foreach off)", torch_adamw(False)),
    ("step inside the backward, weight by weight; fp32 moments", in_backward(state_dtype=torch.float32, chunk=None)),
    ("+ update in chunks of 2^22 elements", in_backward(state_dtype=torch.float32, split=False)),
    ("+ moments in bf16", in_backward(split=False)),
    ("+ Linears over a chunk split: no whole gradient, no kept bf16 copy (--low-memory)", in_backward()),
    ("--low-memory with chunks of 2^20", in_backward(chunk=2**20)),
    ("--low-memory with chunks of 2^24", in_backward(chunk=2**24)),
]


def main():
    args = parse_args(sys.argv[1:], plan=True)
    vit, config = planner.EVAConfig(), unimed_config(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    G, above = 2**30, None
    print(f"{'optimizer':84} {'peak GiB':>9} {'saves':>6}  peak reached in   moments  grads  temps")
    for name, make in LEVERS:
        start = time.perf_counter()
        planner.make_optimizer = make  # what plan_memory builds its optimizer with
        plan = planner.plan_memory(config, LlamaConfig(), vit, dtype=dtype, vit_dtype=dtype, autocast=None,
                                   grad_checkpointing=args.grad_checkpointing, batch_size=args.batch_size,
                                   text_tokens=planner.PLAN_TEXT_TOKENS, device="cpu")
        parts = plan["parts"]
        saves = "" if above is None or name.startswith("--low-memory with") else f"{(above - plan['peak']) / G:.2f}"
        above = plan["peak"] if not name.startswith("--low-memory with") else above
        print(f"{name:84} {plan['peak'] / G:9.2f} {saves:>6}  {plan['phase']:17} {parts['AdamW moments'] / G:6.2f} "
              f"{parts['gradients'] / G:6.2f} {parts['temporaries'] / G:6.2f}   ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
