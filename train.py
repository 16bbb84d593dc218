"""Training Uni-Med: one plain loop over the task mixture, on the built-in demo or on the real data.

    python train.py --router soft --experts 5              # the demo: tiny weights + miniature data
    python train.py --llama Llama-2-7b-chat-hf --vit eva_vit_g.safetensors --data-root data \\
                    --router soft --experts 5              # the paper's run (spec section 8)
    torchrun --nproc_per_node 8 train.py ...               # the same run on 8 GPUs (DDP)

Each step draws one dataset of the mixture by its sampling ratio and a batch from it, so a batch
has one task (as the official loader does), runs the frozen ViT and LLaMA with the trainable
connector and LoRA, and takes one AdamW step. Only the trainable weights are ever saved.

What makes a run reproducible, and resumable exactly:
- the mixture is one seeded sampler shared by every rank; a step draws ONE global batch of
  batch_size x grad_accum x world samples, and micro-batch m (of M = grad_accum x world) takes the
  samples m::M. One process with --grad-accum 2 and two processes with --grad-accum 1 therefore
  compute the same gradient, and the sampler's state is the whole data state.
- dropout (LoRA's) draws from the torch RNG, which is re-seeded from (seed, step, micro-batch)
  before every forward, so a resumed or distributed run draws the same masks.
- checkpoints hold the trainable weights, the optimizer, the scheduler, the sampler, the RNG states,
  the config and the step; they are written to a temporary file and renamed, so a crash mid-save
  leaves the previous checkpoint intact, and a NaN loss stops the run before anything is saved.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import data
import demo
from analysis import plot_training
from files import assign, read_json, read_log, save_torch, write_jsonl
from cmoe import CONNECTORS, RESAMPLERS, ROUTER_INPUTS, ROUTERS, ConnectorConfig
from model import Llama, LlamaConfig, UniMed, UniMedConfig, WordTokenizer, build_prompt, read_checkpoint
from vision import EVAConfig, EVAViT

# -------------------------------------------------------------------------------------------------
# Schedules: the paper's (default), the official config's, and the demo's

SCHEDULES = {
    # spec section 8, paper column: AdamW(0.9, 0.95), 10k warmup to 1e-6, per-step cosine to 1e-7
    "paper": dict(iters=100_000, lr=1e-6, warmup=10_000, warmup_lr=1e-7, min_lr=1e-7, cosine=True,
                  betas=(0.9, 0.95)),
    # official train_configs/uni_med.yaml + LAVIS runner: 5k warmup from 1e-6 to 1e-5, then the
    # per-epoch cosine with max_epoch 1 never moves, so the lr stays 1e-5; AdamW's default betas
    "official": dict(iters=50_000, lr=1e-5, warmup=5_000, warmup_lr=1e-6, min_lr=1e-5, cosine=False,
                     betas=(0.9, 0.999)),
    # the built-in demo: tiny models learn in minutes only with a far larger lr and few steps
    "demo": dict(iters=3000, lr=1e-3, warmup=20, warmup_lr=0.0, min_lr=1e-4, cosine=True,
                 betas=(0.9, 0.95)),
}


def lr_at(step: int, s: dict) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay per step."""
    if step < s["warmup"]:
        return s["warmup_lr"] + (s["lr"] - s["warmup_lr"]) * step / s["warmup"]
    if not s["cosine"]:
        return s["lr"]
    progress = min(1.0, (step - s["warmup"]) / max(1, s["iters"] - s["warmup"]))
    return s["min_lr"] + 0.5 * (s["lr"] - s["min_lr"]) * (1 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------------------
# Command line

def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The flags. With suppress=True, unset flags are absent (to see what a user gave on --resume)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS if suppress else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("weights and data (none given: the built-in demo)")
    g.add_argument("--llama", help="LLaMA-2-7b-chat-hf directory (config.json, safetensors, tokenizer.model)")
    g.add_argument("--vit", help="EVA ViT-G .safetensors (python vision.py convert eva_vit_g.pth ...)")
    g.add_argument("--data-root", help="dataset root in the official layout (spec section 7)")
    g = p.add_argument_group("model: every Table 2 ablation is a flag")
    g.add_argument("--resampler", choices=RESAMPLERS, help="Table 2(b): visual token resampler (default projection)")
    g.add_argument("--rate", type=int, help="Table 2(b): tokens merged into one by the resampler (default 4)")
    g.add_argument("--connector", choices=CONNECTORS, help="Table 2(a): linear, mlp, or Connector-MoE (default moe)")
    g.add_argument("--experts", type=int, help="Table 2(c): number of connector experts N (default 5)")
    g.add_argument("--router", choices=ROUTERS, help="Table 2(a): router type (default soft, Eq. 14)")
    g.add_argument("--router-input", choices=ROUTER_INPUTS, help="Table 2(a): what the router sees (default token_task)")
    g.add_argument("--top-k", type=int, help="experts kept by the sparse router and by LoRA-MoE (default 2)")
    g.add_argument("--router-hidden", type=int, help="router hidden width (default: official 4 x its input)")
    g.add_argument("--lora-r", type=int, help="Table 2(d): LoRA rank (default 8; 4 with --lora-moe)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16; 8 with --lora-moe)")
    g.add_argument("--lora-moe", action="store_true", default=None,
                   help="Table 2(e): LoRA-MoE, 5 LoRA experts per layer with a top-k router")
    g = p.add_argument_group("optimisation (defaults: the paper's, or the demo's on the demo)")
    g.add_argument("--schedule", choices=SCHEDULES, help="lr schedule and AdamW betas: paper (default), "
                   "official (spec section 8), demo (default without weights)")
    g.add_argument("--iters", type=int, help="optimizer steps (paper 100k)")
    g.add_argument("--batch-size", type=int, help="samples per micro-batch per process (default 4)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (paper 1e-6)")
    g.add_argument("--seed", type=int, help="seed of the model init, the mixture and dropout (default 42)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="checkpoint path (default ckpt.pt); its log goes to OUT minus .pt + .jsonl")
    g.add_argument("--resume", help="checkpoint to continue from, exactly (its flags are reused)")
    g.add_argument("--check-data", action=argparse.BooleanOptionalAction, help="check every training row "
                   "(its image's header, its box) before the first step, and stop on any problem (default on)")
    g.add_argument("--log-every", type=int, help="steps between JSONL log lines (default 10)")
    g.add_argument("--plot", metavar="LOG", help="only draw the curves of a log (ckpt.jsonl -> ckpt.png); "
                   "every run draws its own at the end")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 1000; 0: at the end only)")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default cuda if available)")
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="frozen base weights and autocast "
                   "(default bf16 on CUDA, fp32 on CPU); trainable weights are always fp32")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute LLaMA blocks in backward (default on with CUDA)")
    g.add_argument("--dry-run", action="store_true", default=None,
                   help="print the GPU memory of one full-size training step with these flags, and at the "
                   "official precision, and which cards it fits; needs no weights, data or GPU")
    return p


DEFAULTS = dict(resampler="projection", rate=4, connector="moe", experts=5, router="soft",
                router_input="token_task", top_k=2, router_hidden=None, lora_moe=False,
                batch_size=4, grad_accum=1, seed=42, out="ckpt.pt", log_every=10, save_every=1000, dry_run=False,
                check_data=True)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, filled in: the checkpoint's flags on --resume, then the schedule's and DEFAULTS."""
    args = build_parser().parse_args(argv)
    if args.resume:
        given = vars(build_parser(suppress=True).parse_args(argv))
        saved = read_resume(args.resume)["config"]["args"]
        args = argparse.Namespace(**{**vars(args), **saved, **given})  # flags newer than the checkpoint: defaults
    paths = {"--llama": args.llama, "--vit": args.vit, "--data-root": args.data_root}
    if any(paths.values()) and not all(paths.values()) and not args.dry_run:
        missing = " ".join(k for k, v in paths.items() if not v)
        sys.exit(f"train.py: real runs need --llama, --vit and --data-root together; missing {missing}")
    args.demo = not any(paths.values())
    fill(args, **DEFAULTS)
    args.schedule = args.schedule or ("demo" if args.demo else "paper")
    sched = SCHEDULES[args.schedule]
    fill(args, iters=sched["iters"], lr=sched["lr"],  # spec section 3: LoRA-MoE r 4, alpha 8
         lora_r=4 if args.lora_moe else 8, lora_alpha=8.0 if args.lora_moe else 16.0)
    if args.iters < 1 or args.lr <= 0:
        sys.exit(f"train.py: --iters must be >= 1 and --lr > 0 (got {args.iters} and {args.lr})")
    if args.iters <= sched["warmup"]:
        print(f"train.py: note: --iters {args.iters} ends inside the {args.schedule} schedule's "
              f"{sched['warmup']}-step warmup, so the peak lr is never reached")
    fill(args, device="cuda" if torch.cuda.is_available() or args.dry_run else "cpu")  # a dry run plans for a GPU
    cuda = args.device.startswith("cuda")
    fill(args, dtype="bf16" if cuda else "fp32", grad_checkpointing=cuda)
    return args


def fill(args: argparse.Namespace, **defaults) -> None:
    """Give each flag left unset (None) its default; a checkpoint from before a flag existed lacks it."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


# -------------------------------------------------------------------------------------------------
# Model, optimizer, data

def unimed_config(args) -> UniMedConfig:
    connector = ConnectorConfig(resampler=args.resampler, rate=args.rate, connector=args.connector,
                                experts=args.experts, router=args.router, router_input=args.router_input,
                                top_k=args.top_k, router_hidden=args.router_hidden)
    return UniMedConfig(connector=connector, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_experts=5 if args.lora_moe else 1, lora_top_k=args.top_k)


def make_optimizer(model, lr, betas) -> torch.optim.AdamW:
    """AdamW with weight decay 0.05, none on 1-d parameters and biases (as the LAVIS runner does;
    the task tokens are [1, 1, D] tensors, so they are decayed there as here)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def micro_batches(samples: list, rank: int, world: int, accum: int) -> list[list]:
    """This rank's micro-batches of one global batch: micro-batch m of M = accum x world is samples[m::M]."""
    M = accum * world
    return [samples[i * world + rank::M] for i in range(accum)]


def num_image_tokens(connector: ConnectorConfig, vit: EVAConfig) -> int:
    """Visual tokens per image that reach the LLaMA (64 for ViT-G at 224 with rate 4)."""
    patches = vit.grid ** 2
    return patches if connector.resampler == "none" else patches // connector.rate


def count_tokens(tokenizer, batch, image_tokens: int) -> int:
    """Sequence tokens of a batch (BOS + prompt + image + answer + EOS), for tokens/s."""
    n = sum(len(tokenizer.encode(f"{build_prompt(i, batch.images is not None, True)} {a}", bos=True)) + 1
            for i, a in zip(batch.instructions, batch.answers))
    return n + (image_tokens * len(batch.instructions) if batch.images is not None else 0)


# -------------------------------------------------------------------------------------------------
# Checkpoints

def read_resume(path: str) -> dict:
    """A checkpoint of train.py's, holding everything an exact resume needs."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != "unimed-ckpt":
        raise ValueError(f"{path}: not a checkpoint of train.py (an official checkpoint can be "
                         f"evaluated, but holds no optimizer or sampler state to resume from)")
    missing = [k for k in ("step", "optimizer", "scheduler", "sampler", "rng") if k not in ckpt]
    missing += ["config.args"] if "args" not in ckpt["config"] else []
    if missing:
        raise ValueError(f"{path}: cannot resume from it, it has no {', '.join(missing)}")
    return ckpt


def rng_state() -> dict:
    """Every RNG the run touches, as tensors and plain types (torch.load(weights_only=True) safe)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------------
# The loop

class Stop(Exception):
    """Raised to end the run early with a message (NaN loss)."""


@dataclass
class Run:
    """Everything one training run holds between steps."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    model: UniMed
    net: torch.nn.Module            # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixture: data.Mixture
    config: dict                    # what the checkpoint records: model config, base weights, data
    step: int = 0

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    def checkpoint(self) -> dict:
        return {"format": "unimed-ckpt", "step": self.step, "config": self.config,
                "model": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.mixture.state_dict(),
                "rng": rng_state()}


def main(argv=None, stop_at=None) -> dict:
    """Train; returns the last checkpoint dict. `stop_at` ends the run early at that step, with a
    checkpoint, as Ctrl-C does (the tests use it to compare a resumed run with a straight one)."""
    try:
        args = parse_args(argv)
        if args.plot:
            return print(f"curves: {plot_training(args.plot)[0]}")
        if args.dry_run:
            return dry_run(args)
        run = setup(args)
        last = loop(run, stop_at)
    except (Stop, ValueError, OSError) as e:  # a NaN, or bad input: the file, row or flag is named in e
        sys.exit(f"train.py: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if run.main_rank and run.step == args.iters:
        print(f"done: {run.step} steps; checkpoint {args.out}, log {log_path(args)}")
    if run.main_rank and os.path.getsize(log_path(args)):  # the curves beside the checkpoint: ckpt.png
        try:
            print(f"curves: {plot_training(log_path(args))[0]}")
        except ValueError as e:  # a log damaged by an earlier crash: the run itself is saved
            print(f"train.py: no curves drawn: {e}")
    return last


def setup(args) -> Run:
    """Processes, the demo (built once), the data (every row checked), the base weights and the
    model, the optimizer; and everything a checkpoint holds, on --resume."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    llama_dir, vit_path, data_root = demo.demo_paths() if args.demo else (args.llama, args.vit, args.data_root)
    if args.demo:
        if rank == 0:
            print(f"No --llama/--vit/--data-root given: running the built-in demo (tiny weights and data "
                  f"in {demo.DEMO_DIR}/). Real run: python train.py --llama DIR --vit eva_vit_g.safetensors "
                  f"--data-root DIR --router {args.router} --experts {args.experts}")
            demo.build_demo()
        if world > 1:
            dist.barrier()
    schedule = {**SCHEDULES[args.schedule], "iters": args.iters, "lr": args.lr}
    if rank == 0:
        print(f"schedule {args.schedule}: {args.iters} steps, lr {args.lr:g} (warmup {schedule['warmup']} "
              f"from {schedule['warmup_lr']:g}, {'cosine to ' + format(schedule['min_lr'], 'g') if schedule['cosine'] else 'then constant'}), "
              f"AdamW betas {schedule['betas']}, batch {args.batch_size} x accum {args.grad_accum} x "
              f"{world} process(es), seed {args.seed}")
    # the data first: a bad row or file stops the run before minutes of loading weights
    datasets = data.load_datasets(data_root, "train", train=True)
    ratios = demo.DEMO_RATIOS if args.demo else data.RATIOS
    mixture = data.Mixture(datasets, ratios, args.batch_size * args.grad_accum * world, seed=args.seed)
    if args.check_data:
        check_data(datasets, rank, world)

    torch.manual_seed(args.seed)  # same initial trainable weights on every rank
    vit_config = demo.DEMO_EVA if args.demo else EVAConfig()
    model = UniMed.from_pretrained(llama_dir, vit_path, unimed_config(args), vit_config=vit_config,
                                   dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, device=device)
    model.set_gradient_checkpointing(args.grad_checkpointing)
    model.train()
    optimizer = make_optimizer(model, schedule["lr"], schedule["betas"])
    # LambdaLR scales the peak lr by lr_at(step) / peak, stepping once per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, schedule) / schedule["lr"])
    net = model
    if world > 1:
        # Only trainable parameters are reduced. A batch has one task, so the task tokens of the
        # other tasks (and, for QA, the whole connector) get no gradient: find_unused_parameters.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    config = {"unimed": model.config.to_dict(), "vit": asdict(vit_config), "llama_dir": llama_dir,
              "vit_path": vit_path, "data_root": data_root, "demo": args.demo,
              "args": {k: v for k, v in vars(args).items() if k not in ("resume", "demo", "plot")}}
    run = Run(args, rank, world, device, model, net, optimizer, scheduler, mixture, config)
    if args.resume:
        ckpt = read_resume(args.resume)
        model.load_trainable_state_dict(ckpt["model"], source=args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        mixture.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        run.step = ckpt["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {run.step}")
    return run


def check_data(datasets: dict, rank: int, world: int, shown: int = 20) -> None:
    """data.check_datasets on every row before the first step, each process checking a share; all
    problems are reported at once (the first `shown`, and how many more), by rank 0."""
    start = time.perf_counter()
    problems = data.check_datasets(datasets, rank, world)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, problems)
        problems = [p for share in shares for p in share]
    if problems and rank > 0:
        raise ValueError("the training data has problems (rank 0 lists them)")
    if problems:
        more = [f"... and {len(problems) - shown} more"] if len(problems) > shown else []
        raise ValueError(f"the training data has {len(problems)} problem(s), found before the first step:\n  "
                         + "\n  ".join(problems[:shown] + more)
                         + "\nfix them, or skip this check with --no-check-data")
    if rank == 0:
        print(f"checked {sum(map(len, datasets.values()))} training rows of {len(datasets)} datasets in "
              f"{time.perf_counter() - start:.2f} s: no problems")


def train_step(run: Run, samples: list) -> tuple:
    """One optimizer step on one global batch (one dataset, so one task): the micro-batches of this
    rank, their gradients reduced over ranks, AdamW. Returns loss, grad norm, tokens, routing."""
    args, model = run.args, run.model
    loss_sum, tokens, routing = torch.zeros((), device=run.device), 0, None
    image_tokens = num_image_tokens(model.config.connector, model.vit.config)
    for i, micro in enumerate(micro_batches(samples, run.rank, run.world, args.grad_accum)):
        batch = data.collate(micro, image_size=model.image_size)
        images = batch.images.to(run.device) if batch.images is not None else None
        # dropout masks depend on (seed, step, micro-batch) only: exact resume and DDP
        torch.manual_seed((args.seed * 1_000_003 + run.step) * 4099 + i * run.world + run.rank)
        last_micro = i == args.grad_accum - 1
        sync = run.net.no_sync() if run.world > 1 and not last_micro else contextlib.nullcontext()
        with sync:  # UniMed runs its maths under autocast in the base dtype (bf16)
            loss, weights = run.net(images, batch.instructions, batch.answers, batch.task)
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach().float() / args.grad_accum
        tokens += count_tokens(model.tokenizer, batch, image_tokens)
        if weights is not None:
            routing = weights.detach().float().mean(dim=(0, 1))  # [N]
    if run.world > 1:  # every rank sees the same loss, so all stop together on a NaN
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    trainable = [p for p in model.parameters() if p.requires_grad]
    where = f"at step {run.step + 1} (task {samples[0].task!r}, dataset {samples[0].dataset!r})"
    keeps = f"stopping without saving, {args.out} keeps the last good checkpoint"
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        raise Stop(f"loss is {loss_value} {where}; {keeps}")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float("inf")).item()  # measure only
    if not math.isfinite(grad_norm):
        raise Stop(f"gradient norm is {grad_norm} {where}; {keeps}")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_value, grad_norm, tokens * run.world, routing


def loop(run: Run, stop_at=None) -> dict:
    """Steps until --iters, logging every --log-every steps and saving every --save-every and at
    the end. Ctrl-C / SIGTERM: finish the current step, save, return; a second Ctrl-C aborts."""
    args, last, window = run.args, None, []
    bar = tqdm(total=args.iters, initial=run.step, desc="train", disable=not run.main_rank, dynamic_ncols=True)
    with stop_signals(run.main_rank) as stop, open_log(run) as log, bar:
        while run.step < args.iters:
            t0 = time.perf_counter()
            samples = run.mixture.next_batch()  # one dataset, batch_size x grad_accum x world samples
            loss, grad_norm, tokens, routing = train_step(run, samples)
            lr = run.scheduler.get_last_lr()[0]
            window.append((samples[0].task, loss, tokens, time.perf_counter() - t0, routing))
            bar.update(1)
            bar.set_postfix_str(f"{samples[0].task} loss {loss:.3f} lr {lr:.1e} gn {grad_norm:.2f}")
            if log and (run.step % args.log_every == 0 or run.step == args.iters):
                log.write(json.dumps(window_record(window, run.step, lr, grad_norm, run.device)) + "\n")
                log.flush()
                window = []
            stopping = stop_requested(run, stop) or run.step == stop_at
            if run.step == args.iters or stopping or (args.save_every and run.step % args.save_every == 0):
                last = save(run)
            if stopping:
                if run.main_rank:
                    tqdm.write(f"stopped at step {run.step}; saved {args.out} (continue: --resume {args.out})")
                break
    return last


def save(run: Run) -> dict:
    """The checkpoint, written by rank 0 (atomically: a crash mid-save keeps the previous one)."""
    ckpt = run.checkpoint()
    if run.main_rank:
        save_torch(run.args.out, ckpt)
    if run.world > 1:
        dist.barrier()
    return ckpt


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


def stop_requested(run: Run, stop: dict) -> bool:
    """The stop flag, agreed over ranks: if one process was signalled, all stop at this step."""
    if run.world == 1:
        return stop["requested"]
    flag = torch.tensor(float(stop["requested"]), device=run.device)
    dist.all_reduce(flag)
    return bool(flag > 0)


def log_path(args) -> str:
    return os.path.splitext(args.out)[0] + ".jsonl"


@contextlib.contextmanager
def open_log(run: Run):
    """The JSONL log beside the checkpoint (rank 0 only): a new run starts a new log, a resumed one
    appends, after the steps past its checkpoint are cut."""
    if not run.main_rank:
        yield None
        return
    path = log_path(run.args)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if run.args.resume:
        cut_log(path, run.step)
    with open(path, "a" if run.args.resume else "w") as log:
        yield log


def cut_log(path: str, step: int) -> None:
    """Keep the log records up to the checkpoint's `step`: a run killed after its last checkpoint
    logged steps that the resumed run logs again (a line torn by the kill goes too: read_log)."""
    records = read_log(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) < len(records):
        write_jsonl(path, kept)


def window_record(window: list, step: int, lr: float, grad_norm: float, device) -> dict:
    """One log line from the steps since the last, each (task, loss, tokens, seconds, routing): the
    mean loss, also per task, tokens/s, peak memory, and each task's mean routing weights."""
    tasks, losses, tokens, seconds, routing = zip(*window)

    def per_task(values) -> dict:
        return {t: [v for u, v in zip(tasks, values) if u == t and v is not None] for t in sorted(set(tasks))}
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource  # peak resident memory of the process (kilobytes on Linux)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step": step, "loss": round(sum(losses) / len(window), 5),
            "task_loss": {t: round(sum(v) / len(v), 5) for t, v in per_task(losses).items()},
            "lr": lr, "grad_norm": round(grad_norm, 5), "tokens_per_s": round(sum(tokens) / sum(seconds), 1),
            "peak_mem_gb": round(peak_gb, 3),
            "routing": {t: [round(x, 4) for x in torch.stack(v).mean(0).tolist()]
                        for t, v in per_task(routing).items() if v}}


# -------------------------------------------------------------------------------------------------
# Memory planner: python train.py --dry-run [flags]
#
# Will a run fit on a card? The planner answers without weights or a GPU. It builds the full-size
# model for the flags (EVA ViT-G + LLaMA-2-7B, or the LLaMA of --llama's config.json) on fake
# tensors, which have shapes and dtypes but no memory, runs one real training step on them
# (forward, backward, gradient norm, AdamW) and follows the bytes of the live tensor storages op by
# op: what the allocator must hold. The CUDA context and the caching allocator's fragmentation come
# on top, hence the margin in `fits`.
#
# The step's shape is the paper's: batch 4, the flags' image tokens (64), and PLAN_TEXT_TOKENS of
# text per row. A batch is padded to its longest row, and the longest batches of the mixture are
# report generation (MIMIC-CXR, MedPix): a report is cut at 50 words (spec section 6), at most ~100
# LLaMA tokens at 2 tokens a word (English radiology text averages fewer), after ~21 tokens of chat
# template and instruction, with BOS and </s>. QA's 50-word questions with their template come to
# ~145 text tokens but carry no image (64 tokens fewer); every other task is shorter.

PLAN_TEXT_TOKENS = 128
CARDS_GB = (24, 40, 48, 80)
OFFICIAL_PRECISION = dict(dtype=torch.float32, vit_dtype=torch.float16, autocast=torch.float16,
                          grad_checkpointing=False)  # spec section 8: fp32 LLaMA master, fp16 autocast


def meta_model(config: UniMedConfig, llama: LlamaConfig, vit: EVAConfig, dtype, vit_dtype) -> UniMed:
    """Uni-Med on the meta device: every shape and dtype of the real model, no memory."""
    with torch.device("meta"):
        return UniMed(config, Llama(llama).to(dtype), EVAViT(vit).to(vit_dtype), WordTokenizer())


def materialize(model: UniMed, device) -> UniMed:
    """Give each parameter of a meta model uninitialised memory (torch.empty) on `device`: a fake
    tensor under FakeTensorMode, where Module.to cannot move meta or fake parameters."""
    for name, p in list(model.named_parameters()):
        assign(model, name, torch.empty(p.shape, dtype=p.dtype, device=device))
    return model


def plan_batch(batch_size: int, image_size: int, text_tokens: int, device):
    """A caption batch (images, instructions, answers) whose rows have exactly `text_tokens` text
    tokens, BOS to </s>, under WordTokenizer."""
    instruction = "[caption] Take a look at this chest x-ray and describe the findings and impression."
    prompt = len(build_prompt(instruction, True, True).replace("<ImageHere>", " ").split())
    if text_tokens < prompt + 3:
        raise ValueError(f"plan_batch: text_tokens {text_tokens} leaves no answer after the {prompt}-token prompt")
    answer = " ".join(["opacity"] * (text_tokens - 2 - prompt))
    images = torch.zeros(batch_size, 3, image_size, image_size, device=device)
    return images, [instruction] * batch_size, [answer] * batch_size


def plan_step(model: UniMed, optimizer, batch, phase=lambda name: None) -> None:
    """The work of one train.py step on one micro-batch: forward, backward, gradient norm, AdamW.
    `phase(name)` is called as each part begins."""
    phase("forward")
    loss, _ = model(*batch, "caption")  # batch: images, instructions, answers
    phase("backward")
    loss.backward()
    del loss
    phase("optimizer step")
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float("inf"))
    optimizer.step()


class MemoryTracker(TorchDispatchMode):
    """Follows the bytes of every live tensor storage, op by op, on real and fake tensors alike.

    A storage gets a serial number when first seen (an op's output, or `track`), and a weakref
    callback records its release; `phase(name)` marks where a part of the step begins."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (serial, +bytes) when allocated, (serial, -bytes) when released
        self.serial: dict[int, int] = {}         # id(storage) -> serial, while it lives
        self.nbytes: dict[int, int] = {}         # serial -> bytes
        self.phases: list[tuple[int, str]] = []  # (first event of the phase, its name)
        self.weight_copies: set[int] = set()      # serials of casts of a parameter (autocast's copies)

    def track(self, t: torch.Tensor) -> Optional[int]:
        if t.device.type == "meta":  # the model is built on meta before it gets its (fake) tensors
            return None
        storage = t.untyped_storage()
        if id(storage) not in self.serial:
            serial = len(self.nbytes)
            self.serial[id(storage)], self.nbytes[serial] = serial, storage.nbytes()
            self.events.append((serial, storage.nbytes()))
            weakref.finalize(storage, self._release, id(storage), serial)
        return self.serial[id(storage)]

    def _release(self, key: int, serial: int) -> None:
        del self.serial[key]
        self.events.append((serial, -self.nbytes[serial]))

    def phase(self, name: str) -> None:
        self.phases.append((len(self.events), name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
            self.weight_copies.add(self.track(out))
        return out

    def peaks(self) -> tuple[int, int, dict]:
        """The peak bytes, the event that reached it, and each phase's own peak."""
        now, peak, at, phase_peaks = 0, 0, 0, {}
        starts = dict(self.phases)
        name = None
        for i, (_, delta) in enumerate(self.events):
            name = starts.get(i, name)
            now += delta
            if now > peak:
                peak, at = now, i
            phase_peaks[name] = max(phase_peaks.get(name, 0), now)
        return peak, at, phase_peaks

    def live(self, first: int, end: int) -> set[int]:
        """Serials allocated at events [first, end) and still live after them."""
        live = set()
        for serial, delta in self.events[first:end]:
            (live.add if delta > 0 else live.discard)(serial)
        return live


def plan_memory(config: UniMedConfig, llama: LlamaConfig, vit: EVAConfig, *, dtype, vit_dtype, autocast,
                grad_checkpointing: bool, batch_size: int, text_tokens: int, device: str = "cpu") -> dict:
    """Bytes at the peak of one training step, in parts that add up to it, measured on fake tensors.

    dtype is the frozen LLaMA's, which UniMed.autocast also computes in; `autocast` (a dtype)
    overrides that, for the official precision: an fp32 LLaMA under fp16 autocast."""
    model = meta_model(config, llama, vit, dtype, vit_dtype)
    with FakeTensorMode(), MemoryTracker() as mem:
        mem.phase("weights")
        materialize(model, device)
        if autocast is not None:
            model.autocast = lambda: torch.autocast(torch.device(device).type, dtype=autocast)
        model.set_gradient_checkpointing(grad_checkpointing)
        model.train()
        optimizer = make_optimizer(model, 1e-6, (0.9, 0.95))
        for group in optimizer.param_groups:
            group["foreach"] = True  # AdamW's choice for CUDA tensors; a fake tensor does not qualify
        plan_step(model, optimizer, plan_batch(batch_size, vit.img_size, text_tokens, device), mem.phase)
        # What is live now has a name; anything else live at the peak was a temporary, or an
        # activation if the forward made it and left it for the backward.
        params = list(model.parameters())
        named = {"frozen weights": [p for p in params if not p.requires_grad],
                 "trainable weights": [p for p in params if p.requires_grad],
                 "gradients": [p.grad for p in params if p.grad is not None],
                 "AdamW state": [t for state in optimizer.state.values() for t in state.values()]}
        named = {part: {mem.track(t) for t in tensors} for part, tensors in named.items()}
    peak, at, phase_peaks = mem.peaks()
    starts = {name: start for start, name in mem.phases}
    at_peak = mem.live(0, at + 1)
    activations = mem.live(starts["forward"], starts["backward"]) - set().union(*named.values())
    parts = {part: sum(mem.nbytes[s] for s in serials & at_peak) for part, serials in named.items()}
    parts["activations"] = sum(mem.nbytes[s] for s in activations & at_peak)
    parts["temporaries"] = peak - sum(parts.values())
    return {"parts": parts, "peak": peak, "phase_peaks": phase_peaks,
            "phase": [name for start, name in mem.phases if start <= at][-1],  # the phase of the peak
            "after_forward": sum(mem.nbytes[s] for s in activations),
            "weight_copies_after_forward": sum(mem.nbytes[s] for s in activations & mem.weight_copies)}


def fits(peak: int, card_gb: int) -> bool:
    """Room for the peak on a card of card_gb GiB, with 10% for the caching allocator's
    fragmentation and 0.5 GiB for the CUDA context (neither is counted in the peak)."""
    return peak * 1.1 + 0.5 * 2**30 <= card_gb * 2**30


def dry_run(args) -> dict:
    """--dry-run: plan the flags' training step at full size, as we run it and at the official
    precision, and print the parts of each peak and the cards it fits. Reads no weights or data
    (only --llama's config.json, when given)."""
    llama = LlamaConfig()
    if args.llama:
        path = os.path.join(args.llama, "config.json")
        if not os.path.exists(path):
            sys.exit(f"train.py --dry-run: {path} not found (--llama names an HF LLaMA-2 directory)")
        llama = LlamaConfig.from_hf(read_json(path, "LLaMA config.json"))
    vit, config = EVAConfig(), unimed_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fake tensors: no memory is used on either
    image_tokens = num_image_tokens(config.connector, vit)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = dict(batch_size=args.batch_size, text_tokens=PLAN_TEXT_TOKENS, device=device)
    plans = {f"ours: {args.dtype}{', checkpointed' if args.grad_checkpointing else ''}":
             plan_memory(config, llama, vit, dtype=dtype, vit_dtype=dtype, autocast=None,
                         grad_checkpointing=args.grad_checkpointing, **shape),
             "official: fp32 LLaMA, fp16 autocast": plan_memory(config, llama, vit, **OFFICIAL_PRECISION, **shape)}
    c = config.connector
    print(f"Memory plan of one training step (forward, backward, AdamW) on fake tensors ({device}), in GiB")
    print(f"model: EVA ViT-G/14 ({vit.depth} blocks) + LLaMA dim {llama.dim} x {llama.n_layers} layers"
          f"{'' if args.llama else ' (LLaMA-2-7B)'}; connector {c.connector}"
          f"{f', {c.experts} experts, {c.router} router' if c.connector == 'moe' else ''}; "
          f"LoRA r {config.lora_r}{' x 5 experts' if config.lora_experts > 1 else ''}")
    print(f"batch {args.batch_size} x ({image_tokens} image + {PLAN_TEXT_TOKENS} text) tokens: the longest "
          f"batches, 50-word reports (train.py, 'Memory planner')")
    G = 2**30
    rows = [(part, [f"{p['parts'][part] / G:.2f}" for p in plans.values()]) for part in next(iter(plans.values()))["parts"]]
    rows += [("peak", [f"{p['peak'] / G:.2f}" for p in plans.values()]),
             ("peak reached in", [p["phase"] for p in plans.values()]),
             ("kept by forward", [f"{p['after_forward'] / G:.2f} ({p['weight_copies_after_forward'] / G:.2f} weight copies)"
                                  for p in plans.values()]),
             (f"fits {' / '.join(map(str, CARDS_GB))} GB", [" / ".join("yes" if fits(p["peak"], gb) else "no"
                                                               for gb in CARDS_GB) for p in plans.values()])]
    print(f"{'':24}" + "".join(f"{name:>40}" for name in plans))
    for label, cells in rows:
        print(f"{label:24}" + "".join(f"{cell:>40}" for cell in cells))
    print("fits: peak + 10% for allocator fragmentation + 0.5 GiB CUDA context; DDP adds its gradient buckets")
    return plans

if __name__ == "__main__":
    main()
