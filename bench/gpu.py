"""Every GPU measurement of the project in one run and one table (bench/gpu.sh runs this).

    bash bench/gpu.sh            # one H100 or H200: about 7 minutes, random weights, no files
    bash bench/gpu.sh --smoke    # every section at tiny shapes on the CPU: checks the script itself

Sections, each guarded (a failure prints an ERROR row and the next section runs), each row printed
as soon as it is measured, the table also written to $OUT/gpu_table.md when OUT is set:
  1. bandwidth: a device-to-device copy of 2 GiB (reads and writes every byte: 2 x bytes / time)
  2. training step at full size (bench/train_step.py): train.py's step eager and compiled (s/step,
     MFU), peak memory next to the planner's prediction for the same shapes (python -m workshop.plan);
     then train.py --low-memory's step (lib/optim.py): s/step, peak next to its plan
  3. train.py's whole loop on generated full-size chest X-rays (2544 x 3056 JPEGs read by its
     DataLoader workers), compiled: s/step against the bare step's
  4. the LLaMA-2-7B + LoRA step alone, ours eager and compiled against transformers' LlamaForCausalLM
     + peft (same weights, batch 4 x 192 tokens, checkpointing): s/step, MFU, the ratio
  5. EVA ViT-G (39 blocks, 224 px) img/s at batch 1 and 32, against transformers' Blip2VisionModel
  6. LLaMA-2-7B, random bf16 weights: agreement with transformers' LlamaForCausalLM (logits and
     greedy tokens), decode tokens/s at batch 1 for ours eager, transformers eager and ours compiled,
     next to the bandwidth bound (every decoded token reads every weight once)
"""
import argparse
import gc
import importlib.util
import os
import sys
import time
import traceback

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
from lib.files import atomic  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from workshop.hf import hf_config as official_config, ours_to_hf  # noqa: E402
from vision import EVAConfig  # noqa: E402


def bench_module(name: str):
    """bench/{name}.py by its path (bench/vision.py would shadow the top-level vision.py on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_step, bench_llama, bench_vision = (bench_module(n) for n in ("train_step", "llama", "vision"))

FULL = dict(llama=LlamaConfig(), vit=EVAConfig(), dtype=torch.bfloat16, copy_bytes=2 * 2**30, steps=5, warmup=2,
            vit_batches=(1, 32), vit_iters=5, prompt=128, new=64, repeats=2, agree_new=32,
            loop_steps=20, workers=4, xray=(2544, 3056))
SMOKE = dict(llama=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=500,
                               max_seq_len=512),
             vit=EVAConfig(img_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=256),
             dtype=torch.bfloat16, copy_bytes=2**24, steps=1, warmup=1, vit_batches=(1, 4), vit_iters=1,
             prompt=16, new=8, repeats=1, agree_new=8, loop_steps=2, workers=2, xray=(318, 382))
G = 2**30


class Table:
    """Rows printed as they come, and the whole table rewritten to $OUT/gpu_table.md after each."""

    def __init__(self, title: str):
        self.lines = [title, "", "| section | measurement | ours | reference | note |", "|---|---|---|---|---|"]
        self.path = os.path.join(os.environ["OUT"], "gpu_table.md") if os.environ.get("OUT") else None
        for line in self.lines:
            print(line)

    def row(self, *cells) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        print(line)
        self.lines.append(line)
        if self.path:
            with atomic(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def section(table: Table, name: str, fn, *args) -> None:
    """Run one section; an exception becomes an ERROR row (traceback on stderr) and the run goes on."""
    start = time.perf_counter()
    try:
        fn(table, *args)
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the others
        traceback.print_exc()
        table.row(name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", "", "")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    """Best wall time of fn over `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


# ---- 1. bandwidth --------------------------------------------------------------------------------

def bandwidth(table, device, s, state):
    buf = torch.empty(s["copy_bytes"], dtype=torch.uint8, device=device)
    seconds = best_time(lambda: buf.clone(), device, 5)
    state["bandwidth"] = 2 * buf.numel() / seconds
    table.row("bandwidth", f"device copy of {buf.numel() / G:.2f} GiB", f"{state['bandwidth'] / 1e9:.0f} GB/s", "",
              "reads + writes every byte once")


# ---- 2-4. training: the step, beside transformers + peft, the loop ---------------------------------

def training_step(table, device, s, state):
    llama, vit, planned = s["llama"], s["vit"], {}
    # checkpointing off is offered where the plan's peak stays the optimizer step's (workshop/plan.py)
    for compile, checkpointing in ((False, True), (True, True), (True, False)):
        r = train_step.measure(device, llama, vit, s["dtype"], grad_checkpointing=checkpointing, steps=s["steps"],
                               warmup=s["warmup"], compile=compile, plan=checkpointing not in planned)
        planned[checkpointing] = planned.get(checkpointing) or r["planned"]
        name = f"{'compiled' if compile else 'eager'}, {'checkpointed' if checkpointing else 'no checkpointing'}"
        mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "MFU n/a"
        table.row("training step", f"s/step, {name} (batch 4 x {r['tokens']} tokens, bf16)", f"{r['seconds']:.3f}",
                  "target <= 0.09 (H100)", f"{mfu}, {r['flops'] / r['seconds'] / 1e12:.1f} TFLOP/s; first step "
                  f"{r['first']:.0f} s; {r['trainable'] / 1e6:.0f}M trainable")
        if r["peak"] is not None:
            table.row("training step", f"peak memory allocated (GiB), {name}", f"{r['peak'] / G:.2f}",
                      f"planned {planned[checkpointing] / G:.2f} (python -m workshop.plan)",
                      f"plan/measured {planned[checkpointing] / r['peak']:.3f}; reserved {r['reserved'] / G:.2f}")
        else:
            table.row("training step", f"peak memory (GiB), {name}", "n/a on CPU",
                      f"planned {planned[checkpointing] / G:.3f}", "")
        if compile and checkpointing:  # the loop's section trains this run on (saves compiling again)
            state["step compiled"], state["run"] = r["seconds"], r.pop("run")
        del r
        gc.collect()
    # train.py --low-memory (lib/optim.py): AdamW inside the backward, bf16 moments; its plan beside it
    r = train_step.measure(device, llama, vit, s["dtype"], grad_checkpointing=True, steps=s["steps"],
                           warmup=s["warmup"], low_memory=True)
    table.row("training step, --low-memory", f"s/step (batch 4 x {r['tokens']} tokens, bf16, checkpointed)",
              f"{r['seconds']:.3f}", "", "AdamW in the backward, bf16 moments")
    if r["peak"] is not None:
        table.row("training step, --low-memory", "peak memory allocated (GiB)", f"{r['peak'] / G:.2f}",
                  f"planned {r['planned'] / G:.2f} (python -m workshop.plan)",
                  f"plan/measured {r['planned'] / r['peak']:.3f}; reserved {r['reserved'] / G:.2f}; 24 GB card: "
                  f"{'fits' if r['reserved'] + 0.5 * G <= 24 * G else 'does not fit'}")
    else:
        table.row("training step, --low-memory", "peak memory (GiB)", "n/a on CPU", f"planned {r['planned'] / G:.3f}", "")
    del r
    gc.collect()


def training_vs_transformers(table, device, s, state):
    times = train_step.measure_llama(device, s["llama"], s["dtype"], grad_checkpointing=True, tokens=192,
                                     steps=s["steps"], warmup=s["warmup"])
    theirs = times["transformers + peft"]
    for kind, t in times.items():
        mfu = f"MFU {100 * t['mfu']:.1f}%" if t["mfu"] else "MFU n/a"
        ratio = f"{theirs['seconds'] / t['seconds']:.2f}x transformers + peft; " if kind != "transformers + peft" else ""
        table.row("LLaMA + LoRA step", f"s/step, {kind} (batch 4 x 192, checkpointed)", f"{t['seconds']:.3f}",
                  "target >= 2.5x transformers + peft" if kind == "ours compiled" else "",
                  f"{ratio}{mfu}; first step {t['first']:.0f} s")


def training_loop(table, device, s, state):
    r = train_step.loop_rate(state.pop("run"), device, steps=s["loop_steps"], warmup=s["warmup"],
                             workers=s["workers"], image_size=s["xray"])
    bare = state.get("step compiled")
    table.row("training loop", f"s/step of train.py's loop, compiled, {r['workers']} workers, "
              f"{r['image_size'][0]}x{r['image_size'][1]} JPEGs", f"{r['seconds']:.3f}",
              f"the bare step {bare:.3f}" if bare else "", f"{1 / r['seconds']:.2f} steps/s")


# ---- 5. ViT-G ------------------------------------------------------------------------------------

def vit_throughput(table, device, s, state):
    for batch in s["vit_batches"]:
        r = bench_vision.compare(s["vit"], batch, s["dtype"], device, s["vit_iters"])
        table.row("EVA ViT-G", f"img/s, batch {batch}, {s['vit'].depth} blocks", f"{r['ours']:.1f}",
                  f"Blip2VisionModel {r['reference']:.1f}", f"ratio {r['ours'] / r['reference']:.3f}; "
                  f"max abs diff {r['diff']:.1e}")


# ---- 6. LLaMA-2-7B: agreement with transformers, decoding ---------------------------------------

def hf_llama(model: Llama, config: LlamaConfig, device: str, dtype):
    """transformers' LlamaForCausalLM holding our weights, built on the device in `dtype`."""
    import transformers
    hf_config = transformers.LlamaConfig(**{k: v for k, v in official_config(config).items() if k != "architectures"})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict({ours_to_hf(k): v for k, v in model.state_dict().items()})
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def decode_rate(generate, prompt, new, device, repeats) -> tuple[float, list]:
    """Decoded tokens/s at batch 1: the extra time of `new` tokens over 1 token (the prefill), per token."""
    tokens = generate(prompt, new)
    t1 = best_time(lambda: generate(prompt, 1), device, repeats)
    tn = best_time(lambda: generate(prompt, new), device, repeats)
    return (new - 1) / (tn - t1), tokens


def llama_7b(table, device, s, state):
    config, dtype = s["llama"], s["dtype"]
    model = bench_llama.random_model(config, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = state.get("bandwidth", float("nan")) / weight_bytes
    torch.manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, s["prompt"]), device=device)
    ours = lambda ids, n, compile=False: model.generate(ids.tolist(), max_new_tokens=n, eos_id=-1,  # noqa: E731
                                                        compile=compile)[0]

    # agreement with transformers, same weights, same device and dtype
    hf = hf_llama(model, config, device, dtype)
    batch = torch.randint(3, config.vocab_size, (2, s["prompt"]), device=device)
    with torch.no_grad():
        a, b = model(batch).float(), hf(batch).logits.float()
    diff = (a - b).abs().max().item()
    same_argmax = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    theirs = lambda ids, n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: E731
                                        min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    hf_rate, hf_tokens = decode_rate(theirs, prompt, s["agree_new"], device, s["repeats"])
    ours_tokens = ours(prompt, s["agree_new"])
    agree = next((i for i, (x, y) in enumerate(zip(ours_tokens, hf_tokens)) if x != y), len(hf_tokens))
    table.row("LLaMA vs transformers", f"logits, {config.n_layers} layers, {str(dtype)[6:]}, 2 x {s['prompt']} tokens",
              f"max abs diff {diff:.3g}", f"max abs logit {b.abs().max().item():.3g}",
              f"same argmax at {100 * same_argmax:.1f}% of positions")
    table.row("LLaMA vs transformers", "greedy tokens, batch 1", f"{agree}/{len(hf_tokens)} equal before the first "
              "difference", "LlamaForCausalLM.generate", "random weights: near-ties can flip in bf16")
    del hf
    gc.collect()

    eager, eager_tokens = decode_rate(ours, prompt, s["new"], device, s["repeats"])
    name = "LLaMA-2-7B decode" if config.n_layers == 32 else "LLaMA decode"
    table.row(name, "tokens/s, batch 1, eager", f"{eager:.1f}", f"transformers eager {hf_rate:.1f}; bound {bound:.1f}",
              f"{100 * eager / bound:.0f}% of the bound ({weight_bytes / 1e9:.2f} GB of weights)")
    start = time.perf_counter()
    compiled_tokens = ours(prompt, s["new"], compile=True)  # compiles (and captures the CUDA graph)
    first = time.perf_counter() - start
    compiled, _ = decode_rate(lambda ids, n: ours(ids, n, compile=True), prompt, s["new"], device, s["repeats"])
    table.row(name, "tokens/s, batch 1, compiled", f"{compiled:.1f}", f"bound {bound:.1f}",
              f"{100 * compiled / bound:.0f}% of the bound; first call (compile) {first:.0f} s")

    # Compiled against eager: where the greedy tokens part, and how close that step was to a tie. Both
    # decode paths are fed eager's tokens, so each step's logits are compared on the same history.
    same = next((i for i, (x, y) in enumerate(zip(compiled_tokens, eager_tokens)) if x != y), len(eager_tokens))
    eager_logits = forced_logits(model, prompt, eager_tokens, compile=False)
    compiled_logits = forced_logits(model, prompt, eager_tokens, compile=True)
    diff = (compiled_logits - eager_logits).abs().amax(-1)  # [steps]
    note = "no difference"
    if same < len(eager_tokens):
        top2 = eager_logits[same].topk(2).values
        note = (f"eager's top-2 logit gap at token {same}: {(top2[0] - top2[1]).item():.3g} "
                f"(bf16 spacing there {bf16_spacing(top2[0].item()):.3g})")
    table.row(name, "compiled vs eager, greedy tokens", f"{same}/{len(eager_tokens)} equal before the first "
              "difference", f"max abs logit diff: first decode step {diff[1].item():.3g}, all steps "
              f"{diff[1:].max().item():.3g}", note)


def forced_logits(model: Llama, prompt, tokens: list[int], compile: bool) -> torch.Tensor:
    """Logits [len(tokens), vocab] of generate's own steps fed `tokens` (teacher forcing): row 0 from the
    prefill, row k from decode_step (compiled or eager) after tokens[:k]. The inputs are laid out as
    generate lays them, so the compiled step is reused, not recompiled."""
    T, device = prompt.shape[1], prompt.device
    cache = model.kv_cache(1, T + len(tokens), device, model.embed.weight.dtype, compile)
    step = model.decode_function(compile)
    key_mask = torch.ones(1, cache.k[0].shape[2], dtype=torch.bool, device=device)
    fed = torch.tensor(tokens, device=device)[:, None]  # [steps, 1], as generate's `out`
    with torch.no_grad():
        rows = [model(prompt, cache=cache, last_only=True)[:, -1].float()]
        for k in range(len(tokens) - 1):
            if compile:
                torch.compiler.cudagraph_mark_step_begin()
            _, logits = step(fed[k], torch.full((1,), T + k, device=device), key_mask, cache, 0.0, 1.0)
            rows.append(logits.float().clone())  # a copy: the next replay of a CUDA graph overwrites its outputs
    return torch.cat(rows)


def bf16_spacing(x: float) -> float:
    """The distance between bf16 numbers near x: how far apart two logits rounded to bf16 can be told."""
    return 2.0 ** (torch.tensor(abs(x)).log2().floor().item() - 7)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script's logic")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device (use --smoke to check the script on the CPU)")
    s = SMOKE if args.smoke else FULL
    name = "CPU (smoke: tiny shapes)" if args.smoke else torch.cuda.get_device_name()
    import transformers
    table = Table(f"bench/gpu.sh on {name}: torch {torch.__version__}, transformers {transformers.__version__}, "
                  f"random weights")
    state = {}
    for title, fn in (("bandwidth", bandwidth), ("training step", training_step), ("training loop", training_loop),
                      ("LLaMA + LoRA step", training_vs_transformers),
                      ("EVA ViT-G", vit_throughput), ("LLaMA-2-7B", llama_7b)):
        section(table, title, fn, device, s, state)


if __name__ == "__main__":
    main()
