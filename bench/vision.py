"""Throughput of our EVAViT vs transformers' Blip2VisionModel (the same network), same weights, one run.

    python bench/vision.py                 # ViT-G width, 4 blocks, batch 8, fp32 on CPU
    python bench/vision.py --full --iters 2  # the full 39 blocks at batch 1 and 8, fp32 on CPU (minutes)
    python bench/vision.py --device cuda   # the full 39 blocks in bf16, batch 4 and 32
"""
import argparse
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vision import EVAConfig, EVAViT  # noqa: E402


def blip2_from(model: EVAViT):
    """Blip2VisionModel with our weights under its names (qkv bias = q_bias, zeros, v_bias)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel
    c = model.config
    hf = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, image_size=c.img_size, patch_size=c.patch_size,
        layer_norm_eps=c.eps, qkv_bias=True, attn_implementation="sdpa"))
    ours = model.state_dict()
    theirs = {"embeddings.class_embedding": ours["cls_token"],
              "embeddings.position_embedding": ours["pos_embed"],
              "embeddings.patch_embedding.weight": ours["patch_embed.proj.weight"],
              "embeddings.patch_embedding.bias": ours["patch_embed.proj.bias"],
              "post_layernorm.weight": torch.ones(c.width), "post_layernorm.bias": torch.zeros(c.width)}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, value in ours.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            if module == "attn" and kind == "q_bias":
                v = ours[f"blocks.{i}.attn.v_bias"]
                theirs[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat((value, torch.zeros_like(v), v))
            elif module in names:
                theirs[f"encoder.layers.{i}.{names[module]}.{kind}"] = value
    hf.load_state_dict(theirs, strict=True)
    return hf.to(device=ours["cls_token"].device, dtype=ours["cls_token"].dtype).eval()


def best_seconds(fns, images, iters, sync):
    """Best-of-`iters` seconds per forward of each fn, alternating fns so that the load of a shared
    machine hits them alike (the best time is the one least disturbed by it)."""
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, record in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn(images)
            sync()
            record.append(time.perf_counter() - start)
    return [min(t) for t in times]


def compare(config, batch, dtype, device, iters, reference=True) -> dict:
    """img/s of ours and of Blip2VisionModel (reference=True) on the same random weights, and the
    largest difference of their outputs."""
    torch.manual_seed(0)
    with torch.device(device):
        model = EVAViT(config).to(dtype).eval()
        with torch.no_grad():  # the zero placeholders would make CLS and positions trivial
            model.cls_token.normal_(std=0.02)
            model.pos_embed.normal_(std=0.02)
        images = torch.randn(batch, 3, config.img_size, config.img_size, dtype=dtype)
        hf = blip2_from(model) if reference else None  # built on the device: no CPU init of 1B weights
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = [lambda x: model(x)]
    if reference:
        fns.append(lambda x: hf(pixel_values=x, output_hidden_states=True).hidden_states[-1])
    with torch.inference_mode():
        outputs = [fn(images).float() for fn in fns]  # also warms up
        diff = (outputs[0] - outputs[1]).abs().max().item() if reference else None
        rates = [batch / t for t in best_seconds(fns, images, iters, sync)]
    return {"ours": rates[0], "reference": rates[1] if reference else None, "diff": diff}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards of each model (best taken)")
    parser.add_argument("--full", action="store_true", help="on CPU: all 39 blocks at batch 1 and 8")
    args = parser.parse_args()
    if args.device == "cpu":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
        runs = ([(EVAConfig(), batch, torch.float32) for batch in (1, 8)] if args.full else
                [(replace(EVAConfig(), depth=4), 8, torch.float32)])
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
        runs = [(EVAConfig(), batch, torch.bfloat16) for batch in (4, 32)]
    for config, batch, dtype in runs:
        r = compare(config, batch, dtype, args.device, args.iters)
        print(f"{args.device} {str(dtype).split('.')[-1]} depth {config.depth} batch {batch}: "
              f"ours {r['ours']:.3g} img/s, Blip2VisionModel {r['reference']:.3g} img/s, ratio "
              f"{r['ours'] / r['reference']:.3f} (max abs diff of outputs {r['diff']:.2e}; "
              f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
