"""The training step: seconds, ops and kernels, peak memory against the planner, MFU; beside transformers + peft.

    python bench/train_step.py            # CUDA: full-size times; then, on any machine, the op counts
    python bench/train_step.py --counts   # the op counts only (the tiny 32-block shape; CPU: ~5 min)

The step is train.py's own `train_step` (micro-batch forward and backward, gradient norm, fused
AdamW, no host read), on random weights made in place (no files). Full size on CUDA: EVA ViT-G/14
(39 blocks) + LLaMA-2-7B, LoRA r8 on every linear layer + Connector-MoE (5 experts, soft router on
[task token, token]), bf16 frozen weights, fp32 trainable weights under bf16 autocast, gradient
checkpointing; the batch is the memory planner's (workshop/plan.py): 4 x (64 image + 128 text)
tokens, so the measured peak stands next to the planned one. The reference is transformers'
LlamaForCausalLM with peft's LoRA on the same seven linear layers (fp32 adapters under bf16
autocast, as ours), the same base weights, the same 4 x 192 input embeddings, the same checkpointing
(non-reentrant), compared with our LLaMA + LoRA alone on the same step.

Ops per step, at a tiny shape with the real structure (32 LLaMA blocks, 39 ViT blocks, 5 experts,
batch 4 x 192 tokens, widths 64): `dispatched` counts every aten op a TorchDispatchMode sees after
autograd (workshop/ops.py), `kernel ops` those of them that launch work (not views, metadata or bare
allocations); compiled code cannot be watched by a dispatch mode, so `kernels` counts from
torch.profiler, the same way for eager and compiled: innermost aten ops that launch work (inductor's
extern calls, e.g. its matrix products, included) plus inductor's generated kernels, a multi-tensor
(_foreach_, _fused_) op as one, as a GPU launches it. On CUDA `kernels` is the device's own count.

Model FLOPs per step (recomputation not counted, as MFU is defined): frozen LLaMA linear layers
4 N T (forward 2 N T + input gradients 2 N T; no weight gradients), its attention 3 x 4 L d T^2 per
sequence, the ViT forward 2 N_vit T_vit + 4 depth width T_vit^2, the trainable connector 6 N_c T_img.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workshop import plan as planner  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from lib.compiled import compile_for_training  # noqa: E402
from workshop.ops import OpCounter, profiled_kernels  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Llama, LlamaConfig, UniMedConfig  # noqa: E402
from vision import EVAConfig  # noqa: E402

CPU_LLAMA = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=688, vocab_size=32000)
CPU_EVA = EVAConfig(img_size=224, patch_size=14, width=128, depth=2, num_heads=2, mlp_dim=512)
# the op counts' shape: every block, expert, token and image of the real step, at width 64
TINY_LLAMA = LlamaConfig(dim=64, n_layers=32, n_heads=4, n_kv_heads=4, hidden_dim=172, vocab_size=512)
TINY_EVA = EVAConfig(img_size=224, patch_size=14, width=32, depth=39, num_heads=2, mlp_dim=128)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "A800": 312.0}  # dense bf16


def random_weights(module: torch.nn.Module) -> None:
    """Random weights in place (norm gains 1): never touching the disk, 8B parameters take a second."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if p.ndim == 1 and "norm" in name else p.normal_(0.0, 0.02)


def llama_flops(llama: LlamaConfig, model: torch.nn.Module, batch: int, tokens: int) -> float:
    n_llama = sum(p.numel() for n, p in model.named_parameters()
                  if p.ndim == 2 and "embed" not in n and "lora_" not in n and "router" not in n)
    return batch * (4 * n_llama * tokens + 3 * 4 * llama.n_layers * llama.dim * tokens ** 2)


def model_flops(model, llama: LlamaConfig, vit: EVAConfig, batch: int, tokens: int, image_tokens: int) -> float:
    """Model FLOPs of one step (see the docstring)."""
    n_vit = sum(p.numel() for p in model.vit.parameters() if p.ndim >= 2)
    n_conn = sum(p.numel() for p in model.connector.parameters())
    T_vit = vit.grid ** 2 + 1
    return llama_flops(llama, model.llama, batch, tokens) + batch * (
        2 * n_vit * T_vit + 4 * vit.depth * vit.width * T_vit ** 2 + 6 * n_conn * image_tokens)


# ---- the steps ---------------------------------------------------------------------------------

def unimed_run(device: str, llama: LlamaConfig, vit: EVAConfig, dtype, grad_checkpointing: bool,
               compile: bool = False, config: UniMedConfig = UniMedConfig(), low_memory: bool = False) -> train.Run:
    """A train.Run around a random full-structure UniMed (no data: the caller hands train_step its batches)."""
    torch.manual_seed(0)
    model = planner.materialize(planner.meta_model(config, llama, vit, dtype, dtype), device)
    random_weights(model)
    model.set_gradient_checkpointing(grad_checkpointing)
    model.train()
    if compile:
        compile_for_training(model)
    optimizer = planner.make_optimizer(model, 1e-6, (0.9, 0.95), low_memory)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    args = SimpleNamespace(seed=0, grad_accum=1, low_memory=low_memory)
    return train.Run(args, 0, 1, torch.device(device), model, model, optimizer, scheduler, None, {})


def plan_batches(run: train.Run, batch_size: int, text_tokens: int) -> list:
    images, instructions, answers = planner.plan_batch(batch_size, run.model.image_size, text_tokens, "cpu")
    return [data.Batch(images, instructions, answers, "caption")]


def our_llama(config: LlamaConfig, dtype, device: str, weights: dict, grad_checkpointing: bool, compile: bool):
    """Our LLaMA on `weights`, LoRA r8 on its seven linear layers, trainable weights in fp32 as UniMed keeps them."""
    model = planner.materialize(Llama(config).to(device="meta", dtype=dtype), device)
    model.load_state_dict(weights)
    apply_lora(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing = grad_checkpointing
    if compile:
        for block in model.layers:
            block.compile(dynamic=False)
    return model.train()


def hf_llama(config: LlamaConfig, dtype, device: str, weights: dict, grad_checkpointing: bool):
    """transformers' LlamaForCausalLM on `weights` with peft's LoRA r8 on the same seven layers."""
    import peft
    import transformers
    from workshop.hf import hf_config, ours_to_hf
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
                k: v for k, v in hf_config(config).items() if k != "architectures"}))
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict({ours_to_hf(k): v for k, v in weights.items()})
    # peft keeps the adapters in fp32 on a bf16 model (autocast_adapter_dtype), as UniMed does
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if grad_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf.train()


def llama_steps(device: str, config: LlamaConfig, dtype, grad_checkpointing: bool, batch_size: int,
                tokens: int, kinds=("ours", "ours compiled", "transformers + peft")) -> dict:
    """One optimizer step of a LLaMA with LoRA alone, on the same random base weights and input
    embeddings [B, T, dim]: kind -> (step function, model)."""
    torch.manual_seed(0)
    weights = planner.materialize(Llama(config).to(device="meta", dtype=dtype), device)
    random_weights(weights)
    weights = weights.state_dict()
    embeds = torch.randn(batch_size, tokens, config.dim, device=device, dtype=dtype) * 0.02
    labels = torch.randint(0, config.vocab_size, (batch_size, tokens), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def step_of(model, loss_of):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)

        def step():
            with autocast:
                loss = loss_of(model)
            loss.backward()
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    ours_loss = lambda m: torch.nn.functional.cross_entropy(  # noqa: E731
        m(inputs_embeds=embeds)[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    steps = {}
    for kind in kinds:
        if kind == "transformers + peft":
            model = hf_llama(config, dtype, device, weights, grad_checkpointing)
            steps[kind] = (step_of(model, lambda m: m(inputs_embeds=embeds, labels=labels).loss), model)
        else:
            model = our_llama(config, dtype, device, weights, grad_checkpointing, compile=kind == "ours compiled")
            steps[kind] = (step_of(model, ours_loss), model)
    return steps


# ---- measurements ------------------------------------------------------------------------------

def seconds_per_step(step, device: str, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step over `steps` after `warmup` untimed ones, seconds of the first step: compiling)."""
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()  # no read between steps, as in train.py: the host runs ahead of the device
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, first


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"


def peak_tflops_of(device: str):
    name = device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device.startswith("cuda") else None


def measure(device: str, llama: LlamaConfig, vit: EVAConfig, dtype, grad_checkpointing: bool, batch_size: int = 4,
            text_tokens: int = planner.PLAN_TEXT_TOKENS, steps: int = 5, warmup: int = 2, compile: bool = False,
            plan: bool = True, low_memory: bool = False) -> dict:
    """Time train.py's step (`steps` after `warmup`); the peak covers them all (the first step creates
    AdamW's state, as the plan's step does), and with `plan` the planner's peak for it (~30 s at full
    size). The result holds the run, for `loop_rate`."""
    config = UniMedConfig()
    planned = planner.plan_memory(config, llama, vit, dtype=dtype, vit_dtype=dtype, autocast=None,
                                  grad_checkpointing=grad_checkpointing, batch_size=batch_size,
                                  text_tokens=text_tokens, device=device, low_memory=low_memory)["peak"] if plan else None
    run = unimed_run(device, llama, vit, dtype, grad_checkpointing, compile, low_memory=low_memory)
    batch = plan_batches(run, batch_size, text_tokens)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, first = seconds_per_step(lambda: train.train_step(run, batch), device, steps, warmup)
    image_tokens = planner.num_image_tokens(config.connector, vit)
    flops = model_flops(run.model, llama, vit, batch_size, image_tokens + text_tokens, image_tokens)
    peak_tflops = peak_tflops_of(device)
    return {"device": device_name(device), "seconds": seconds, "first": first, "flops": flops, "planned": planned,
            "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            "peak": torch.cuda.max_memory_allocated(device) if cuda else None,
            "reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
            "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None, "peak_tflops": peak_tflops,
            "tokens": image_tokens + text_tokens, "image_tokens": image_tokens, "run": run}


def measure_llama(device: str, llama: LlamaConfig, dtype, grad_checkpointing: bool, batch_size: int = 4,
                  tokens: int = 192, steps: int = 5, warmup: int = 2, kinds=("ours", "ours compiled",
                                                                              "transformers + peft")) -> dict:
    """Seconds per step and MFU of the LLaMA + LoRA step of each kind, measured one after the other."""
    out, peak_tflops = {}, peak_tflops_of(device)
    for kind in kinds:
        (step, model), = llama_steps(device, llama, dtype, grad_checkpointing, batch_size, tokens, (kind,)).values()
        seconds, first = seconds_per_step(step, device, steps, warmup)
        flops = llama_flops(llama, model, batch_size, tokens)
        out[kind] = {"seconds": seconds, "first": first, "flops": flops,
                     "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None}
        del step, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def count(step, device: str) -> dict:
    """Ops of one step (after two warm-up steps): the dispatch mode's counts where it can see them
    (eager), and the profiler's kernels (see the docstring)."""
    for _ in range(2):
        step()
    counts = {"kernels": profiled_kernels(step, device)}
    if not compiled_step(step):
        with OpCounter() as ops:
            step()
        counts.update(dispatched=ops.dispatched, kernel_ops=ops.kernels, reads=len(ops.reads))
    return counts


def compiled_step(step) -> bool:
    return getattr(step, "compiled", False)


def counts(device: str = "cpu", grad_checkpointing: bool = True) -> dict:
    """Ops per step at the tiny 32-block shape: train.py's step, eager and compiled (and compiled
    without checkpointing), and the LLaMA + LoRA step alone, ours eager and compiled, and
    transformers + peft. fp32 on the CPU, bf16 on CUDA."""
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's CPU kernels by name, in the profiler
    torch._dynamo.reset()  # code compiled before without them would be reused
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out = {}
    for name, compile, checkpointing in (("eager", False, grad_checkpointing), ("compiled", True, grad_checkpointing),
                                         ("compiled, no checkpointing", True, False)):
        run = unimed_run(device, TINY_LLAMA, TINY_EVA, dtype, checkpointing, compile)
        batch = plan_batches(run, 4, planner.PLAN_TEXT_TOKENS)
        step = lambda: train.train_step(run, batch)  # noqa: E731
        step.compiled = compile
        out[f"train.py step, {name}"] = count(step, device)
    for kind, (step, _) in llama_steps(device, TINY_LLAMA, dtype, grad_checkpointing, 4, 192).items():
        step.compiled = kind == "ours compiled"
        out[f"LLaMA + LoRA step, {kind}"] = count(step, device)
    return out


def write_xrays(root: str, size: tuple, images: int = 8, rows: int = 64) -> None:
    """A MIMIC-CXR training set in the official layout: `images` generated grey JPEGs of `size`
    (W, H; a real one is ~2544 x 3056, smooth, ~1-2 MB) and `rows` reports of 100 words naming them."""
    rng = np.random.default_rng(0)
    W, H = size
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    for i in range(images):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        lungs = np.exp(-(((x / W - cx) ** 2) * 8 + ((y / H - cy) ** 2) * 4))
        pixels = 40 + 160 * lungs + rng.normal(0, 6, (H, W)).astype(np.float32)
        path = os.path.join(root, "MIMIC-CXR-JPG", "2.0.0", "files", f"p{i}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").save(path, quality=90)
    report = " ".join(["opacity"] * 100)
    table = {"train": [{"image_path": [f"p{n % images}.jpg"], "report": report} for n in range(rows)]}
    os.makedirs(os.path.join(root, "MIMIC_caption"))
    with open(os.path.join(root, "MIMIC_caption", "annotation_small.json"), "w") as f:
        json.dump(table, f)


def loop_rate(run: train.Run, device: str, steps: int, warmup: int, workers: int,
              image_size: tuple = (2544, 3056)) -> dict:
    """Seconds per step of train.py's whole loop (its DataLoader reading the images, its log, its reads
    on log steps) for `run` (a `measure` result's) on generated full-size chest X-rays, batch 4;
    checkpoints are not written."""
    from unittest import mock
    with tempfile.TemporaryDirectory() as root:
        write_xrays(root, image_size)
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # the other datasets are absent
            datasets = data.load_datasets(root, "train")
        run.mixture = data.Mixture(datasets, {"mimic_cxr": 1}, 4, seed=0)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            run.args = train.parse_args(["--log-every", "10", "--save-every", "0",
                                         "--workers", str(workers), "--device", device,
                                         "--out", os.path.join(root, "ckpt.pt")])
        cuda = device.startswith("cuda")
        with mock.patch.object(train, "save", lambda run: None):
            run.args.iters = run.step + warmup
            train.loop(run)  # warm-up: the workers start, the first batches compile what is new
            run.args.iters = run.step + steps
            start = time.perf_counter()
            train.loop(run)  # the last step reads its loss back: the device's work is in the time
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "workers": workers, "image_size": image_size}


def print_counts(device: str) -> None:
    print(f"ops per step at the tiny shape (LLaMA {TINY_LLAMA.dim} x {TINY_LLAMA.n_layers} blocks, EVA "
          f"{TINY_EVA.width} x {TINY_EVA.depth} blocks, batch 4 x 192 tokens), {device_name(device)}, checkpointed:")
    print(f"{'step':48}{'dispatched':>12}{'kernel ops':>12}{'kernels':>10}{'host reads':>12}")
    for name, c in counts(device).items():
        print(f"{name:48}{c.get('dispatched', '-'):>12}{c.get('kernel_ops', '-'):>12}{c['kernels']:>10}"
              f"{c.get('reads', '-'):>12}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--counts", action="store_true", help="only the op counts at the tiny shape")
    p.add_argument("--low-memory", action="store_true", help="train.py --low-memory's optimizer (lib/optim.py)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if not args.counts:
        # CUDA: the full-size model; CPU: the tiny shape (times only compare the three steps on one machine)
        llama, vit = (LlamaConfig(), EVAConfig()) if cuda else (TINY_LLAMA, TINY_EVA)
        dtype = torch.bfloat16 if cuda else torch.float32
        checkpointing = not args.no_grad_checkpointing
        G = 2**30
        for compile, checkpoint in ((False, checkpointing), (True, checkpointing), (True, False)):
            r = measure(args.device, llama, vit, dtype, checkpoint, args.batch_size, steps=args.steps,
                        warmup=args.warmup, compile=compile, plan=cuda, low_memory=args.low_memory)
            print(f"train.py step{', --low-memory' if args.low_memory else ''}, "
                  f"{'compiled' if compile else 'eager'}{'' if checkpoint else ', no checkpointing'}: "
                  f"{r['seconds']:.3f} s/step (first "
                  f"{r['first']:.1f} s), {r['flops'] / r['seconds'] / 1e12:.2f} TFLOP/s" +
                  (f", MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']}" if r["mfu"] else "") +
                  (f"; peak {r['peak'] / G:.2f} GiB, planned {r['planned'] / G:.2f}" if cuda else ""))
            del r["run"]
        print(f"  {r['device']}; LLaMA {llama.dim} x {llama.n_layers} + EVA {vit.width} x {vit.depth}, "
              f"{r['trainable'] / 1e6:.1f}M trainable; batch {args.batch_size} x {r['tokens']} tokens "
              f"({r['image_tokens']} image), {'bf16 + autocast' if cuda else 'fp32'}, checkpointing "
              f"{'on' if checkpointing else 'off'}; {r['flops'] / 1e12:.3f} model TFLOP/step")
        times = measure_llama(args.device, llama, dtype, checkpointing, args.batch_size, r["tokens"],
                              steps=args.steps, warmup=args.warmup)
        for kind, t in times.items():
            print(f"LLaMA + LoRA step, {kind}: {t['seconds']:.3f} s/step (first {t['first']:.1f} s)"
                  + (f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] else "") + (
                      f"; {times['transformers + peft']['seconds'] / t['seconds']:.2f}x transformers + peft"
                      if kind != "transformers + peft" else ""))
    print_counts(args.device)


if __name__ == "__main__":
    main()
