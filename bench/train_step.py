"""Seconds per training step, peak memory against the planner's prediction, and model FLOPs utilisation.

    python bench/train_step.py                  # CUDA: the full model; CPU: a scaled-down shape
    python bench/train_step.py --low-memory     # the same with train.py --low-memory's optimizer

On CUDA the model is the real size with random bf16 weights made on the GPU (no files): EVA ViT-G/14
(39 blocks) + LLaMA-2-7B, LoRA r8 on every linear layer + Connector-MoE (5 experts, soft router on
[task token, token]), bf16 frozen weights, fp32 trainable weights under bf16 autocast, gradient
checkpointing of the LLaMA blocks. The batch and the step are the memory planner's
(workshop/plan.py): batch 4 x (64 image + 128 text) tokens, forward, backward, gradient norm, AdamW, so the
measured peak over all the steps (torch.cuda.max_memory_allocated) stands next to the planned steady
state (step 2 on) for the same shapes.
Targets (issue 10): <= 40 GB peak, <= 0.18 s/step on an H100 (the paper: ~0.36 s/step on an A800).
On CPU it runs a small shape in fp32 so that the script stays alive in CI-like settings.

Model FLOPs per step (recomputation not counted, as MFU is defined): frozen LLaMA linear layers
4 N T (forward 2 N T + input gradients 2 N T; no weight gradients), its attention 3 x 4 L d T^2 per
sequence, the ViT forward 2 N_vit T_vit + 4 depth width T_vit^2, the trainable connector 6 N_c T_img.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workshop import plan as planner  # noqa: E402
from model import LlamaConfig, UniMedConfig  # noqa: E402
from vision import EVAConfig  # noqa: E402

CPU_LLAMA = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=688, vocab_size=32000)
CPU_EVA = EVAConfig(img_size=224, patch_size=14, width=128, depth=2, num_heads=2, mlp_dim=512)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "A800": 312.0}  # dense bf16


def random_weights(module: torch.nn.Module) -> None:
    """Random weights in place (norm gains 1): never touching the disk, 8B parameters take a second."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if p.ndim == 1 and "norm" in name else p.normal_(0.0, 0.02)


def model_flops(model, llama: LlamaConfig, vit: EVAConfig, batch: int, tokens: int, image_tokens: int) -> float:
    """Model FLOPs of one step (see the docstring)."""
    n_llama = sum(p.numel() for n, p in model.llama.named_parameters()
                  if p.ndim == 2 and "embed" not in n and "lora_" not in n)
    n_vit = sum(p.numel() for p in model.vit.parameters() if p.ndim >= 2)
    n_conn = sum(p.numel() for p in model.connector.parameters())
    T_vit = vit.grid ** 2 + 1
    return batch * (4 * n_llama * tokens + 3 * 4 * llama.n_layers * llama.dim * tokens ** 2 + 2 * n_vit * T_vit
                    + 4 * vit.depth * vit.width * T_vit ** 2 + 6 * n_conn * image_tokens)


def measure(device: str, llama: LlamaConfig, vit: EVAConfig, dtype, grad_checkpointing: bool, batch_size: int = 4,
            text_tokens: int = planner.PLAN_TEXT_TOKENS, steps: int = 5, warmup: int = 2,
            low_memory: bool = False) -> dict:
    """Time `steps` training steps after `warmup` ones; the peak covers them all (from step 2 on,
    AdamW's moments are live throughout, as in the plan's step 2)."""
    config = UniMedConfig()
    plan = planner.plan_memory(config, llama, vit, dtype=dtype, vit_dtype=dtype, autocast=None,
                               grad_checkpointing=grad_checkpointing, batch_size=batch_size,
                               text_tokens=text_tokens, device=device, low_memory=low_memory)
    torch.manual_seed(0)
    model = planner.materialize(planner.meta_model(config, llama, vit, dtype, dtype), device)
    random_weights(model)
    model.set_gradient_checkpointing(grad_checkpointing)
    model.train()
    optimizer = planner.make_optimizer(model, 1e-6, (0.9, 0.95), low_memory)
    batch = planner.plan_batch(batch_size, vit.img_size, text_tokens, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        planner.plan_steps(model, optimizer, batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    image_tokens = planner.num_image_tokens(config.connector, vit)
    flops = model_flops(model, llama, vit, batch_size, image_tokens + text_tokens, image_tokens)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None
    return {"device": name, "seconds": seconds, "flops": flops, "planned": plan["peak"],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak": torch.cuda.max_memory_allocated(device) if cuda else None,
            "reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
            "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None, "peak_tflops": peak_tflops,
            "tokens": image_tokens + text_tokens, "image_tokens": image_tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--low-memory", action="store_true", help="train.py --low-memory's optimizer (lib/optim.py)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    llama, vit = (LlamaConfig(), EVAConfig()) if cuda else (CPU_LLAMA, CPU_EVA)
    dtype = torch.bfloat16 if cuda else torch.float32
    checkpointing = cuda and not args.no_grad_checkpointing
    r = measure(args.device, llama, vit, dtype, checkpointing, args.batch_size, steps=args.steps, warmup=args.warmup,
                low_memory=args.low_memory)
    G = 2**30
    print(f"device: {r['device']}")
    print(f"model: LLaMA {llama.dim}x{llama.n_layers} + EVA {vit.width}x{vit.depth}, {r['trainable'] / 1e6:.1f}M "
          f"trainable; batch {args.batch_size} x {r['tokens']} tokens ({r['image_tokens']} image), "
          f"{'bf16 + autocast' if cuda else 'fp32'}, grad checkpointing {'on' if checkpointing else 'off'}"
          f"{', --low-memory' if args.low_memory else ''}")
    print(f"s/step: {r['seconds']:.3f}   model TFLOP/step: {r['flops'] / 1e12:.2f}   achieved TFLOP/s: "
          f"{r['flops'] / r['seconds'] / 1e12:.2f}" + (f"   MFU: {100 * r['mfu']:.1f}% of {r['peak_tflops']} TFLOP/s"
                                                        if r["mfu"] else ""))
    print(f"peak memory: planned {r['planned'] / G:.2f} GiB" + (
        f", measured {r['peak'] / G:.2f} GiB allocated ({r['planned'] / r['peak']:.3f} x), "
        f"{r['reserved'] / G:.2f} GiB reserved" if cuda else " (measured on CUDA only)"))
    if cuda:
        print(f"targets: <= 0.18 s/step ({'ok' if r['seconds'] <= 0.18 else 'MISSED'}), "
              f"<= 40 GB ({'ok' if r['peak'] <= 40 * G else 'MISSED'}); paper: ~0.36 s/step on an A800")


if __name__ == "__main__":
    main()
