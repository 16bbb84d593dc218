"""Training Uni-Med: one plain loop over the task mixture, on the built-in demo or on the real data.

    python train.py --router soft --experts 5              # the demo: tiny weights + miniature data
    python train.py --llama Llama-2-7b-chat-hf --vit eva_vit_g.safetensors --data-root data \\
                    --router soft --experts 5              # the paper's run (spec section 8)
    torchrun --nproc_per_node 8 train.py ...               # the same run on 8 GPUs (DDP)

Each step draws one dataset of the mixture by its sampling ratio and a batch from it, so a batch
has one task (as the official loader does), runs the frozen ViT and LLaMA with the trainable
connector and LoRA under bf16 autocast, and takes one AdamW step. Only trainable weights are saved.

A run resumes exactly: the mixture is one seeded sampler shared by every rank (micro-batch m of a
step takes samples m::M of one global batch, so 2 processes equal 1 with --grad-accum 2); dropout
is re-seeded from (seed, step, micro-batch); a checkpoint holds the weights, the optimizer, the
schedule, the sampler and the RNGs, written atomically. A NaN loss stops the run before it saves.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from cmoe import CONNECTORS, RESAMPLERS, ROUTER_INPUTS, ROUTERS, ConnectorConfig
from lib.checkpoint import FORMAT, is_ours, read_checkpoint
from lib.files import save_torch
from lib.compiled import compile_for_training
from lib.loader import drawn_batches
from lib.optim import AdamWInBackward
from lib.run import Stop, any_rank, log_record, open_log, read_back, stop_signals
from model import LORA_MOE, UniMed, UniMedConfig
from vision import EVAConfig

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
    "demo": dict(iters=5000, lr=1e-3, warmup=20, warmup_lr=0.0, min_lr=1e-4, cosine=True,
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
# Command line: a flag per ablation of Table 2; the model's defaults are its configs' (cmoe, model)

C, U = ConnectorConfig, UniMedConfig  # the defaults the help strings name
RUN_DEFAULTS = dict(batch_size=4, grad_accum=1, seed=42, out="ckpt.pt", log_every=10, save_every=1000,
                    check_data=True, lora_moe=False, low_memory=False)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The flags. With suppress=True, unset flags are absent (to see what a user gave on --resume)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS if suppress else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("weights and data (none given: the built-in demo)")
    g.add_argument("--llama", help="LLaMA-2-7b-chat-hf directory (config.json, safetensors, tokenizer.model)")
    g.add_argument("--vit", help="EVA ViT-G .safetensors (python -m workshop.convert eva_vit_g.pth ...)")
    g.add_argument("--data-root", help="dataset root in the official layout (spec section 7)")
    g = p.add_argument_group("model: every Table 2 ablation is a flag")
    g.add_argument("--resampler", choices=RESAMPLERS, help=f"Table 2(b): visual token resampler (default {C.resampler})")
    g.add_argument("--rate", type=int, help=f"Table 2(b): tokens merged into one by the resampler (default {C.rate})")
    g.add_argument("--connector", choices=CONNECTORS, help=f"Table 2(a): linear, mlp, or Connector-MoE (default {C.connector})")
    g.add_argument("--experts", type=int, help=f"Table 2(c): number of connector experts N (default {C.experts})")
    g.add_argument("--router", choices=ROUTERS, help=f"Table 2(a): router type (default {C.router}, Eq. 14)")
    g.add_argument("--router-input", choices=ROUTER_INPUTS, help=f"Table 2(a): what the router sees (default {C.router_input})")
    g.add_argument("--top-k", type=int, help=f"experts kept by the sparse router and by LoRA-MoE (default {C.top_k})")
    g.add_argument("--router-hidden", type=int, help="router hidden width (default: official 4 x its input)")
    g.add_argument("--lora-r", type=int, help=f"Table 2(d): LoRA rank (default {U.lora_r}; {LORA_MOE['lora_r']} with --lora-moe)")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default {U.lora_alpha:g}; {LORA_MOE['lora_alpha']:g} with --lora-moe)")
    g.add_argument("--lora-moe", action="store_true", default=None,
                   help=f"Table 2(e): LoRA-MoE, {LORA_MOE['lora_experts']} LoRA experts per layer with a top-k router")
    g = p.add_argument_group("optimisation (defaults: the paper's, or the demo's on the demo)")
    g.add_argument("--schedule", choices=SCHEDULES, help="lr schedule and AdamW betas: paper (default), "
                   "official (spec section 8), demo (default without weights)")
    g.add_argument("--iters", type=int, help="optimizer steps (paper 100k)")
    g.add_argument("--batch-size", type=int, help=f"samples per micro-batch per process (default {RUN_DEFAULTS['batch_size']})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (paper 1e-6)")
    g.add_argument("--seed", type=int, help=f"seed of the model init, the mixture and dropout (default {RUN_DEFAULTS['seed']})")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="checkpoint path (default ckpt.pt); its log goes to OUT minus .pt + .jsonl")
    g.add_argument("--resume", help="checkpoint to continue from, exactly (its flags are reused)")
    g.add_argument("--check-data", action=argparse.BooleanOptionalAction, help="check every training row "
                   "(its image's header, its box) before the first step, and stop on any problem (default on)")
    g.add_argument("--log-every", type=int, help=f"steps between JSONL log lines (default {RUN_DEFAULTS['log_every']})")
    g.add_argument("--save-every", type=int, help=f"steps between checkpoints (default {RUN_DEFAULTS['save_every']}; 0: at the end only)")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default cuda if available)")
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="frozen base weights and autocast "
                   "(default bf16 on CUDA, fp32 on CPU); trainable weights are always fp32")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute LLaMA blocks in backward (default on with CUDA)")
    g.add_argument("--low-memory", action=argparse.BooleanOptionalAction, help="AdamW steps each weight inside "
                   "the backward, moments in bf16 (lib/optim.py): the paper's run fits a 24 GB card (default off)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="compile the ViT and LLaMA blocks (default off)")
    g.add_argument("--workers", type=int, help="DataLoader processes reading images ahead (default 4 with CUDA, 0 on CPU)")
    return p


def parse_args(argv=None, plan: bool = False) -> argparse.Namespace:
    """Flags, filled in: the checkpoint's flags on --resume, then the defaults. `plan`: for the
    memory planner (workshop/plan.py), which needs no weights and plans for a GPU."""
    args = build_parser().parse_args(argv)
    if args.resume:
        given = vars(build_parser(suppress=True).parse_args(argv))
        saved = read_resume(args.resume)["config"]["args"]
        args = argparse.Namespace(**{**vars(args), **saved, **given})  # flags newer than the checkpoint: defaults
    paths = {"--llama": args.llama, "--vit": args.vit, "--data-root": args.data_root}
    if any(paths.values()) and not all(paths.values()) and not plan:
        missing = " ".join(k for k, v in paths.items() if not v)
        sys.exit(f"train.py: real runs need --llama, --vit and --data-root together; missing {missing}")
    args.demo = not any(paths.values())
    model = {k: v for k, v in asdict(ConnectorConfig()).items() if k not in ("vit_width", "llm_width")}
    lora = LORA_MOE if args.lora_moe else asdict(UniMedConfig())
    fill(args, **RUN_DEFAULTS, **model, lora_r=lora["lora_r"], lora_alpha=lora["lora_alpha"])
    args.schedule = args.schedule or ("demo" if args.demo else "paper")
    sched = SCHEDULES[args.schedule]
    fill(args, iters=sched["iters"], lr=sched["lr"])
    if args.iters < 1 or args.lr <= 0:
        sys.exit(f"train.py: --iters must be >= 1 and --lr > 0 (got {args.iters} and {args.lr})")
    if args.iters <= sched["warmup"]:
        print(f"train.py: note: --iters {args.iters} ends inside the {args.schedule} schedule's "
              f"{sched['warmup']}-step warmup, so the peak lr is never reached")
    fill(args, device="cuda" if torch.cuda.is_available() or plan else "cpu")
    cuda = args.device.startswith("cuda")
    fill(args, dtype="bf16" if cuda else "fp32", grad_checkpointing=cuda, compile=False, workers=4 if cuda else 0)
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
    lora_experts = LORA_MOE["lora_experts"] if args.lora_moe else UniMedConfig.lora_experts
    return UniMedConfig(connector=connector, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_experts=lora_experts, lora_top_k=args.top_k)


def make_optimizer(model, lr, betas, low_memory=False) -> torch.optim.Optimizer:
    """AdamW with weight decay 0.05, none on 1-d parameters and biases (as the LAVIS runner does;
    the task tokens are [1, 1, D] tensors, so they are decayed there as here). low_memory: the
    same AdamW stepping each weight inside the backward, its moments in bf16 (lib/optim.py)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    if low_memory:
        return AdamWInBackward(model, groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # one kernel, step counts on the device


def micro_batches(samples: list, rank: int, world: int, accum: int) -> list[list]:
    """This rank's micro-batches of one global batch: micro-batch m of M = accum x world is samples[m::M]."""
    M = accum * world
    return [samples[i * world + rank::M] for i in range(accum)]


def make_batches(datasets: dict, image_size: int, rank: int, world: int, accum: int, drawn: list) -> list:
    """This rank's micro-batches of one drawn global batch, images read (in a DataLoader worker)."""
    return [data.collate([datasets[name].get(i, t) for name, i, t in micro], image_size=image_size)
            for micro in micro_batches(drawn, rank, world, accum)]


@dataclass
class Base:
    """What a run trains on: the frozen base weights, the data, and the mixture's sampling ratios."""
    llama_dir: str
    vit_path: str
    data_root: str
    vit: EVAConfig = field(default_factory=EVAConfig)
    ratios: dict = field(default_factory=lambda: dict(data.RATIOS))


# -------------------------------------------------------------------------------------------------
# Checkpoints

def read_resume(path: str) -> dict:
    """A checkpoint of train.py's, holding everything an exact resume needs."""
    ckpt = read_checkpoint(path)
    if not is_ours(ckpt):
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
    sampler: dict = field(default_factory=dict)  # the mixture's state after the last batch trained on

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    def checkpoint(self) -> dict:
        return {"format": FORMAT, "step": self.step, "config": self.config,
                "model": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler,
                "rng": rng_state()}


def main(argv=None, stop_at=None) -> dict:
    """Train; returns the last checkpoint dict. `stop_at` ends the run early at that step, with a
    checkpoint, as Ctrl-C does (the tests use it to compare a resumed run with a straight one)."""
    try:
        args = parse_args(argv)
        rank, world = start_processes(args)
        if args.demo:  # no weights given: README command 1, the built-in demo (made once, by rank 0)
            from workshop.demo import demo_base
            base = Base(**demo_base(build=rank == 0, hint=f"--router {args.router} --experts {args.experts}"))
        else:
            base = Base(args.llama, args.vit, args.data_root)
        if world > 1:
            dist.barrier()
        run = setup(args, rank, world, base)
        last = loop(run, stop_at)
    except (Stop, ValueError, OSError) as e:  # a NaN, or bad input: the file, row or flag is named in e
        sys.exit(f"train.py: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if run.main_rank and run.step == args.iters:
        print(f"done: {run.step} steps; checkpoint {args.out}, log {log_path(args)} "
              f"(its curves: python -m workshop.curves {log_path(args)})")
    return last


def start_processes(args) -> tuple[int, int]:
    """This process's rank and the world size; under torchrun, the process group and its device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    return rank, world


def setup(args, rank: int, world: int, base: Base) -> Run:
    """The data (every row checked), the base weights and the model, the optimizer; and
    everything a checkpoint holds, on --resume."""
    device = torch.device(args.device)
    if args.low_memory and (args.grad_accum > 1 or world > 1):
        raise ValueError("--low-memory steps each weight inside its backward, so there is no whole gradient to "
                         "accumulate (--grad-accum) or to average over processes (DDP): run it alone with --grad-accum 1")
    schedule = {**SCHEDULES[args.schedule], "iters": args.iters, "lr": args.lr}
    if rank == 0:
        print(f"schedule {args.schedule}: {args.iters} steps, lr {args.lr:g} (warmup {schedule['warmup']} "
              f"from {schedule['warmup_lr']:g}, {'cosine to ' + format(schedule['min_lr'], 'g') if schedule['cosine'] else 'then constant'}), "
              f"AdamW betas {schedule['betas']}, batch {args.batch_size} x accum {args.grad_accum} x "
              f"{world} process(es), seed {args.seed}")
    # the data first: a bad row or file stops the run before minutes of loading weights
    datasets = data.load_datasets(base.data_root, "train", train=True)
    mixture = data.Mixture(datasets, base.ratios, args.batch_size * args.grad_accum * world, seed=args.seed)
    if args.check_data:
        check_data(datasets, rank, world)

    torch.manual_seed(args.seed)  # same initial trainable weights on every rank
    model = UniMed.from_pretrained(base.llama_dir, base.vit_path, unimed_config(args), vit_config=base.vit,
                                   dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, device=device)
    model.set_gradient_checkpointing(args.grad_checkpointing)
    model.train()
    if args.compile:
        compile_for_training(model)
    optimizer = make_optimizer(model, schedule["lr"], schedule["betas"], args.low_memory)
    # LambdaLR scales the peak lr by lr_at(step) / peak, stepping once per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, schedule) / schedule["lr"])
    net = model
    if world > 1:
        # Only trainable parameters are reduced. A batch has one task, so the task tokens of the
        # other tasks (and, for QA, the whole connector) get no gradient: find_unused_parameters.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    config = {"unimed": model.config.to_dict(), "vit": asdict(base.vit), "llama_dir": base.llama_dir,
              "vit_path": base.vit_path, "data_root": base.data_root, "demo": args.demo,
              "args": {k: v for k, v in vars(args).items() if k not in ("resume", "demo")}}
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


def train_step(run: Run, micros: list) -> tuple:
    """One optimizer step on this rank's micro-batches of one global batch (one dataset, so one task),
    their gradients reduced over ranks, AdamW. Returns the loss and the gradient norm as device
    tensors (the loop reads them on log steps only: a read waits for the device), tokens, routing."""
    args, model = run.args, run.model
    loss_sum, tokens, routing = torch.zeros((), device=run.device), 0, None
    for i, batch in enumerate(micros):
        images = batch.images.to(run.device, non_blocking=True) if batch.images is not None else None
        # dropout masks depend on (seed, step, micro-batch) only: exact resume and DDP
        torch.manual_seed((args.seed * 1_000_003 + run.step) * 4099 + i * run.world + run.rank)
        last_micro = i == args.grad_accum - 1
        sync = run.net.no_sync() if run.world > 1 and not last_micro else contextlib.nullcontext()
        with sync:  # UniMed runs its maths under autocast in the base dtype (bf16)
            loss, weights, n = run.net(images, batch.instructions, batch.answers, batch.task)
            (loss / args.grad_accum).backward()  # with --low-memory, each weight takes its AdamW step in here
        loss_sum += loss.detach().float() / args.grad_accum
        tokens += n
        if weights is not None:
            routing = weights.detach().float().mean(dim=(0, 1))  # [N]
    if run.world > 1:  # every rank sees the same loss, so all stop together on a NaN
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    if args.low_memory:  # each weight took its step in the backward, which summed the squares of its gradient
        grad_norm = run.optimizer.grad_norm()
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    run.optimizer.step()  # with --low-memory, the steps are taken: this ends them
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_sum, grad_norm, tokens * run.world, routing


def loop(run: Run, stop_at=None) -> dict:
    """Steps until --iters, logging every --log-every steps and saving every --save-every and at
    the end. Ctrl-C / SIGTERM: finish the current step, save, return; a second Ctrl-C aborts."""
    args, last, window = run.args, None, []
    bar = tqdm(total=args.iters, initial=run.step, desc="train", disable=not run.main_rank, dynamic_ncols=True)
    resume_step = run.step if args.resume else None
    make = partial(make_batches, run.mixture.datasets, run.model.image_size, run.rank, run.world, args.grad_accum)
    batches = drawn_batches(lambda: (run.mixture.draw(), run.mixture.state_dict()), make, args.workers,
                            pin=run.device.type == "cuda")  # batch_size x grad_accum x world samples a step
    with stop_signals(run.main_rank) as stop, open_log(log_path(args), resume_step, run.main_rank) as log, bar, \
            contextlib.closing(batches):
        while run.step < args.iters:
            t0 = time.perf_counter()
            micros, drawn, run.sampler = next(batches)
            loss, grad_norm, tokens, routing = train_step(run, micros)
            window.append(dict(step=run.step, task=micros[0].task, dataset=drawn[0][0], loss=loss,
                               grad_norm=grad_norm, tokens=tokens, seconds=time.perf_counter() - t0, routing=routing))
            bar.update(1)
            stopping = any_rank(stop["requested"], run.world, run.device) or run.step == stop_at
            saving = run.step == args.iters or stopping or (args.save_every and run.step % args.save_every == 0)
            if saving or run.step % args.log_every == 0:
                read_back(window, args.out)  # a NaN since the last read stops the run here, before a save
            lr = run.scheduler.get_last_lr()[0]
            if run.step % args.log_every == 0 or run.step == args.iters:
                bar.set_postfix_str(f"{window[-1]['task']} loss {window[-1]['loss']:.3f} lr {lr:.1e} "
                                    f"gn {window[-1]['grad_norm']:.2f}")
                if log:
                    log.write(json.dumps(log_record(window, run.step, lr, window[-1]["grad_norm"], run.device)) + "\n")
                    log.flush()
                window = []
            if saving:
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


def log_path(args) -> str:
    return os.path.splitext(args.out)[0] + ".jsonl"


if __name__ == "__main__":
    main()
