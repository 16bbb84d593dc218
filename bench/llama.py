"""Speed of our LLaMA against transformers' LlamaForCausalLM, same weights, same run.

Default: a ~106M-parameter LLaMA (dim 768, 8 layers, 12 heads, MLP 2048, vocab 32000) on CPU in
fp32. Prefill = the time of generate(max_new_tokens=1) on a 128-token prompt; decode = the extra
time per token of generate(max_new_tokens=N) over that, with the KV cache, at batch 1 and 8, for
ours eager, ours with the decode step compiled (generate(compile=True); its first call compiles,
and is reported) and transformers. All decode greedily with eos disabled, so they produce the same
number of tokens, and the tokens are compared.

    python bench/llama.py [--threads 1]   # on a busy machine one thread gives steadier figures
    python bench/llama.py --device cuda --size 7b   # bf16 random 7B, decode vs the bandwidth bound
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Llama, LlamaConfig  # noqa: E402

SIZES = {"100m": LlamaConfig(dim=768, n_layers=8, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000),
         "7b": LlamaConfig()}


def timed(fns: dict, device, repeats) -> dict:
    """Best wall time of each closure over `repeats` rounds (after a warm-up). The closures take turns
    within each round, so a change in machine load hits all of them alike."""
    best = {name: float("inf") for name in fns}
    for attempt in range(repeats + 1):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if attempt > 0:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def random_model(config, dtype, device):
    """Random weights, allocated once in the target dtype (7B in bf16 needs 13.5 GB, not 27 GB first)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)  # RMSNorm gains
    return model.eval()


def hf_copy(model, config):
    """transformers' model with our weights (fp32 CPU only: the reference is timed where it runs)."""
    import transformers
    from workshop.hf import hf_config as official_config, ours_to_hf
    hf_config = transformers.LlamaConfig(**{k: v for k, v in official_config(config).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict({ours_to_hf(k): v for k, v in model.state_dict().items()})
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def ours_generate(model, prompts, new, compile=False):
    return lambda: model.generate(prompts.tolist(), max_new_tokens=new, eos_id=-1, compile=compile)


def hf_generate(hf, prompts, new):
    return lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False)


def rates(t1, tn, prompts, new):
    """Prefill tokens/s from generate(1 new token), decode tokens/s from the extra time of `new` tokens."""
    B, T = prompts.shape
    return B * T / t1, B * (new - 1) / (tn - t1)


def bench_cpu(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    config = SIZES[args.size]
    model = random_model(config, torch.float32, "cpu")
    hf = hf_copy(model, config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA {args.size}: {n_params / 1e6:.1f}M params, fp32, CPU, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt))
        start = time.perf_counter()
        compiled_tokens = ours_generate(model, prompts, args.new, compile=True)()
        print(f"batch {batch}: first compiled call (compiles) {time.perf_counter() - start:.1f} s")
        with torch.no_grad():
            hf_tokens = hf_generate(hf, prompts, args.new)()[:, args.prompt:].tolist()
        same = compiled_tokens == ours_generate(model, prompts, args.new)() == hf_tokens
        fns = {"ours 1": ours_generate(model, prompts, 1), "ours n": ours_generate(model, prompts, args.new),
               "compiled 1": ours_generate(model, prompts, 1, compile=True),
               "compiled n": ours_generate(model, prompts, args.new, compile=True),
               "hf 1": hf_generate(hf, prompts, 1), "hf n": hf_generate(hf, prompts, args.new)}
        with torch.no_grad():
            t = timed(fns, "cpu", args.repeats)
        r = {name: rates(t[f"{name} 1"], t[f"{name} n"], prompts, args.new) for name in ("ours", "compiled", "hf")}
        rows += [(f"prefill tokens/s, batch {batch}", *(r[n][0] for n in ("ours", "compiled", "hf"))),
                 (f"decode tokens/s, batch {batch}", *(r[n][1] for n in ("ours", "compiled", "hf")))]
        print(f"batch {batch}: the same {args.new} tokens from ours eager, ours compiled and transformers: {same}")
    print(f"{'':28s}{'ours':>10s}{'compiled':>10s}{'transformers':>14s}{'ours/tf':>9s}{'compiled/tf':>13s}")
    for what, a, c, b in rows:
        print(f"{what:28s}{a:10.1f}{c:10.1f}{b:14.1f}{a / b:9.2f}{c / b:13.2f}")


def bench_gpu(args):
    config = SIZES[args.size]
    model = random_model(config, torch.bfloat16, args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # achievable bandwidth: a device-to-device copy reads and writes every byte once
    buf = torch.empty(weight_bytes // 8, dtype=torch.uint8, device=args.device)
    copy_time = timed({"copy": lambda: buf.clone()}, args.device, 5)["copy"]
    bandwidth = 2 * buf.numel() / copy_time
    del buf
    prompts = torch.randint(3, config.vocab_size, (1, args.prompt), device=args.device)
    fns = {"1": ours_generate(model, prompts, 1), "n": ours_generate(model, prompts, args.new)}
    with torch.no_grad():
        t = timed(fns, args.device, args.repeats)
    prefill, decode = rates(t["1"], t["n"], prompts, args.new)
    bound = bandwidth / weight_bytes  # every decode step reads all weights once
    print(f"LLaMA {args.size}: {weight_bytes / 1e9:.2f} GB of bf16 weights on {torch.cuda.get_device_name()}")
    print(f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s -> bound {bound:.1f} tokens/s at batch 1")
    print(f"prefill {prefill:.0f} tokens/s; decode {decode:.1f} tokens/s = {decode / bound:.0%} of the bound")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=SIZES, default="100m")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length")
    parser.add_argument("--new", type=int, default=32, help="new tokens for the decode timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.device == "cpu":
        bench_cpu(args)
    else:
        bench_gpu(args)


if __name__ == "__main__":
    main()
