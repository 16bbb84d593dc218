"""Seconds per training step, peak memory and model FLOPs utilisation of Uni-Med training.

    python bench/train_step.py                  # CUDA: the full model; CPU: a scaled-down shape

On CUDA the model is the real size with random weights: EVA ViT-G/14 (39 blocks) + LLaMA-2-7B,
LoRA r8 on every linear layer + Connector-MoE (5 experts, soft router on [task token, token]),
batch 4, 64 image tokens + about 150 text tokens per sample, bf16 frozen weights, fp32 trainable
weights under bf16 autocast, gradient checkpointing of the LLaMA blocks: exactly train.py's step
(forward, backward, AdamW). Targets (issue 10): <= 40 GB peak, <= 0.18 s/step on an H100 (the paper:
~0.36 s/step on an A800). On CPU it runs a small shape in fp32 so CI can keep it alive.

Model FLOPs per step (recomputation not counted, as MFU is defined): frozen LLaMA linear layers
4 N T (forward 2 N T + input gradients 2 N T; no weight gradients), its attention 3 x 4 L d T^2 per
sequence, the ViT forward 2 N_vit T_vit, the trainable connector 6 N_c T_img.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from cmoe import ConnectorConfig  # noqa: E402
from model import Llama, LlamaConfig, Tokenizer, UniMed, UniMedConfig  # noqa: E402
from vision import EVAConfig, EVAViT  # noqa: E402

CPU_LLAMA = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=688, vocab_size=32000)
CPU_EVA = EVAConfig(img_size=224, patch_size=14, width=128, depth=2, num_heads=2, mlp_dim=512)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "A800": 312.0}  # dense bf16, SXM


def random_base(llama_config, vit_config, dtype, device):
    """LLaMA and EVA with random weights (never touching the disk: 7B + 1B parameters)."""
    with torch.device("meta"):
        llama, vit = Llama(llama_config), EVAViT(vit_config)
    for module in (llama, vit):
        module.to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.fill_(1.0) if p.ndim == 1 and "norm" in name else p.normal_(0.0, 0.02)
        module.to(dtype)
    return llama, vit


def text_of(tokenizer, n_tokens: int) -> str:
    """A string of about n_tokens tokens of this tokenizer."""
    words, text = "the left lung shows a small opacity in the upper zone and no effusion".split(), ""
    i = 0
    while len(tokenizer.encode(text, bos=False)) < n_tokens:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=60, help="instruction tokens per sample")
    p.add_argument("--answer-tokens", type=int, default=90, help="answer tokens per sample")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)

    llama_config, vit_config = (LlamaConfig(), EVAConfig()) if cuda else (CPU_LLAMA, CPU_EVA)
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as tmp:  # any LLaMA-style sentencepiece model will do
        texts = [f"[INST] sample {i}: " + "the left lung shows a small opacity in the upper zone [/INST]"
                 for i in range(200)]
        train.write_tokenizer(texts, os.path.join(tmp, "tokenizer.model"), 300)
        tokenizer = Tokenizer(os.path.join(tmp, "tokenizer.model"))
    llama, vit = random_base(llama_config, vit_config, dtype, device)
    config = UniMedConfig(connector=ConnectorConfig())  # the main model: projection a=4, 5 experts, soft
    model = UniMed(config, llama, vit, tokenizer).to(device)
    model.set_gradient_checkpointing(cuda and not args.no_grad_checkpointing)
    model.train()
    optimizer = train.make_optimizer(model, 1e-6, (0.9, 0.95))
    trainable = [p for p in model.parameters() if p.requires_grad]

    B = args.batch_size
    images = torch.randn(B, 3, vit_config.img_size, vit_config.img_size, device=device)
    instructions = ["[caption] " + text_of(tokenizer, args.prompt_tokens)] * B
    answers = [text_of(tokenizer, args.answer_tokens)] * B
    image_tokens = train.num_image_tokens(model.config.connector, vit_config)
    text_tokens = len(tokenizer.encode(train.build_prompt(instructions[0], True, True) + " " + answers[0])) + 1
    T = image_tokens + text_tokens
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss, _ = model(images, instructions, answers, "caption")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps

    # model FLOPs of one step (see the docstring)
    n_llama = sum(p.numel() for n, p in llama.named_parameters() if p.ndim == 2 and "embed" not in n
                  and "lora_" not in n)
    n_vit = sum(p.numel() for p in vit.parameters() if p.ndim >= 2)
    n_conn = sum(p.numel() for p in model.connector.parameters())
    L, d = llama_config.n_layers, llama_config.dim
    T_vit = vit_config.grid ** 2 + 1
    flops = B * (4 * n_llama * T + 3 * 4 * L * d * T * T + 2 * n_vit * T_vit
                 + 4 * vit_config.depth * vit_config.width * T_vit ** 2 + 6 * n_conn * image_tokens)
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        name, peak = f"CPU ({torch.get_num_threads()} threads)", None
    n_train = sum(p.numel() for p in trainable)
    print(f"device: {name}")
    print(f"model: LLaMA {llama_config.dim}x{llama_config.n_layers} + EVA {vit_config.width}x{vit_config.depth}, "
          f"{n_train / 1e6:.1f}M trainable; batch {B} x {T} tokens ({image_tokens} image + {text_tokens} text), "
          f"{'bf16 + autocast' if cuda else 'fp32'}, grad checkpointing "
          f"{'on' if cuda and not args.no_grad_checkpointing else 'off'}")
    print(f"s/step: {seconds:.3f}   peak memory: {peak_gb:.2f} GB   model TFLOP/step: {flops / 1e12:.2f}   "
          f"achieved TFLOP/s: {flops / seconds / 1e12:.2f}"
          + (f"   MFU: {100 * flops / seconds / 1e12 / peak:.1f}% of {peak} TFLOP/s" if peak else ""))
    if cuda:
        print(f"targets: <= 0.18 s/step ({'ok' if seconds <= 0.18 else 'MISSED'}), "
              f"<= 40 GB ({'ok' if peak_gb <= 40 else 'MISSED'}); paper: ~0.36 s/step on an A800")


if __name__ == "__main__":
    main()
