"""LLaMA-2-7B at real size on a CPU: ours against transformers' LlamaForCausalLM, same files, same run.

    python bench/llama7b.py              # writes ~13.5 GB of random weights to a temporary directory,
                                         # measures both, removes the directory; ~15 min on 2 cores
    python bench/llama7b.py --dir DIR    # reuse (or write once into) DIR, which is kept
    python bench/llama7b.py --threads 1  # on a busy machine: no thread waits for a descheduled sibling

The weights are random bf16 in the official HF layout of Llama-2-7b-hf: two safetensors shards, their
index and config.json. Each model is measured in its own child process (two 7B models do not fit
beside each other in 24 GiB), the same steps in the same order, each child starting with the files
read once into the page cache (on a machine whose memory is shared, part of freshly written weights
is evicted, and whichever process maps them first would pay for reading that back from disk):
  1. load (ours: Llama.from_pretrained; transformers: LlamaForCausalLM.from_pretrained)
  2. the first call, generate(prompt, 1 token): load + this = the time to the first token. Both libraries
     map the files (safetensors, no copy) and touch the weights only when first used, so load time
     alone misleads. Page faults and resident memory are recorded around each step.
  3. a warm-up call, then greedy decoding of 16 tokens at batch 1 with the KV cache: tokens/s from the
     extra time of 17 new tokens over 1, and the tokens themselves (they must be the same).
Peak resident memory is the child's VmHWM (the goal: at most 1.1 x the bytes of the weights). Each
step also records its CPU seconds (user + system) and the load average: on a shared machine the
wall time of the same step varies twofold with the other jobs, the CPU time much less.
"""
import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib.files import atomic  # noqa: E402
from model import HF_KEYS, LlamaConfig  # noqa: E402
from workshop.hf import hf_config as official_config  # noqa: E402

PROMPT, NEW = 32, 17  # prompt tokens; new tokens of the timed call (the first comes from the prefill)
SHARD_BYTES = 10 * 10**9  # the official Llama-2-7b-hf has two shards: 9.98 GB and 3.50 GB


# ---- writing the weights -------------------------------------------------------------------------

def hf_shapes(c: LlamaConfig) -> dict:
    """Official key -> shape, in the order of the official files."""
    kv = c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        for proj, shape in (("self_attn.q_proj", (c.dim, c.dim)), ("self_attn.k_proj", (kv, c.dim)),
                            ("self_attn.v_proj", (kv, c.dim)), ("self_attn.o_proj", (c.dim, c.dim)),
                            ("mlp.gate_proj", (c.hidden_dim, c.dim)), ("mlp.up_proj", (c.hidden_dim, c.dim)),
                            ("mlp.down_proj", (c.dim, c.hidden_dim)), ("input_layernorm", (c.dim,)),
                            ("post_attention_layernorm", (c.dim,))):
            shapes[f"model.layers.{i}.{proj}.weight"] = shape
    shapes["model.norm.weight"] = (c.dim,)
    shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    assert len(shapes) == 3 + 9 * c.n_layers and len(HF_KEYS) == 12
    return shapes


def write_shard(path: str, shapes: dict, seed: int) -> None:
    """One safetensors file written tensor by tensor (safetensors' save_file would need the whole shard,
    10 GB, in memory first): the header with every offset, then each tensor's bytes as it is drawn.
    Matrices ~ N(0, 0.02) like a fresh LLaMA, norm gains 1."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with atomic(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.bfloat16)
            t.normal_(0.0, 0.02, generator=generator) if len(shape) > 1 else t.fill_(1.0)
            f.write(t.view(torch.int16).numpy().data)


def write_weights(path: str, config: LlamaConfig) -> int:
    """Random bf16 weights in the official layout; returns their bytes."""
    shapes, shards, size = hf_shapes(config), [{}], 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for k, (name, shard) in enumerate(zip(names, shards)):
        write_shard(os.path.join(path, name), shard, seed=k)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": {key: n for n, s in zip(names, shards) for key in s}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**official_config(config), "torch_dtype": "bfloat16"}, f)
    return total


# ---- one model, in a child process ---------------------------------------------------------------

def memory() -> dict:
    """This process's resident memory now and at its peak, in bytes (from /proc/self/status)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def measured(fn) -> tuple:
    """fn's result, and its wall and CPU seconds, page faults (minor, major), the load average and the
    resident memory after it."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, {"seconds": seconds, "cpu_seconds": cpu, "system_seconds": after.ru_stime - before.ru_stime,
                    "minor_faults": after.ru_minflt - before.ru_minflt,
                    "major_faults": after.ru_majflt - before.ru_majflt, "load": os.getloadavg()[0], **memory()}


def child(which: str, path: str, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    prompt = torch.randint(3, 32000, (1, PROMPT))
    if which == "ours":
        from model import Llama
        model, load = measured(lambda: Llama.from_pretrained(path, dtype=torch.bfloat16))
        generate = lambda n: model.generate(prompt.tolist(), max_new_tokens=n, eos_id=-1)[0]  # noqa: E731
    else:
        import transformers
        hf, load = measured(lambda: transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval())
        mask = torch.ones_like(prompt)
        generate = lambda n: hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, PROMPT:].tolist()
    with torch.no_grad():
        _, first = measured(lambda: generate(1))
        generate(2)  # warm-up
        _, one = measured(lambda: generate(1))
        tokens, many = measured(lambda: generate(NEW))
    return {"load": load, "first": first, "one": one, "many": many, "tokens": tokens,
            "decode_rate": (NEW - 1) / (many["seconds"] - one["seconds"]), "peak": memory()["VmHWM"]}


def read_through(path: str) -> None:
    """Read every file of `path` once, so that the next child finds them in the page cache."""
    buffer = bytearray(64 << 20)
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def run_child(which: str, path: str, threads: int) -> dict:
    read_through(path)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which, "--dir", path,
                          "--threads", str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench/llama7b.py: the {which} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the comparison ------------------------------------------------------------------------------

def report(results: dict, weight_bytes: int) -> None:
    G = 1e9
    print(f"\n{'':44s}{'ours':>12s}{'transformers':>14s}")
    rows = [("load (s)", lambda r: r["load"]["seconds"]),
            ("first call: generate 1 token (s)", lambda r: r["first"]["seconds"]),
            ("time to first token = load + first call (s)", lambda r: r["load"]["seconds"] + r["first"]["seconds"]),
            ("  CPU seconds: load, first call", lambda r: (r["load"]["cpu_seconds"], r["first"]["cpu_seconds"])),
            ("  of which in the kernel: load, first call", lambda r: (r["load"]["system_seconds"],
                                                                  r["first"]["system_seconds"])),
            ("  page faults in load (minor, thousands)", lambda r: r["load"]["minor_faults"] / 1e3),
            ("  page faults in first call (minor, thousands)", lambda r: r["first"]["minor_faults"] / 1e3),
            ("  major page faults (disk reads): load, first call",
             lambda r: (r["load"]["major_faults"], r["first"]["major_faults"])),
            ("  resident after load: anonymous, file (GB)",
             lambda r: (r["load"]["RssAnon"] / G, r["load"]["RssFile"] / G)),
            ("  after the first call: anonymous, file (GB)",
             lambda r: (r["first"]["RssAnon"] / G, r["first"]["RssFile"] / G)),
            ("generate 1 token, warm (s)", lambda r: r["one"]["seconds"]),
            ("  CPU seconds, page faults (thousands)",
             lambda r: (r["one"]["cpu_seconds"], r["one"]["minor_faults"] / 1e3)),
            (f"generate {NEW} tokens, warm (s)", lambda r: r["many"]["seconds"]),
            ("  CPU seconds", lambda r: r["many"]["cpu_seconds"]),
            ("load average: first call, timed calls", lambda r: (r["first"]["load"], r["many"]["load"])),
            (f"decode tokens/s ({NEW - 1} tokens, batch 1)", lambda r: r["decode_rate"]),
            ("peak resident memory (GB)", lambda r: r["peak"] / G),
            ("peak resident / weight bytes", lambda r: r["peak"] / weight_bytes)]
    def cell(v, width):
        return f"{v:{width}.2f}" if not isinstance(v, tuple) else f"{', '.join(f'{x:.2f}' for x in v):>{width}s}"
    for name, value in rows:
        print(f"{name:44s}{cell(value(results['ours']), 12)}{cell(value(results['transformers']), 14)}")
    ours, theirs = results["ours"]["tokens"], results["transformers"]["tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    print(f"greedy tokens: {agree}/{len(ours)} equal before the first difference (ours {ours[:6]}..., "
          f"transformers {theirs[:6]}...)")
    bandwidth = weight_bytes * results["ours"]["decode_rate"] / G
    print(f"weights {weight_bytes / G:.2f} GB; ours decodes at {bandwidth:.1f} GB/s of weights read")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="weights directory: reused if it holds config.json, else written and kept")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each model (0: torch's default)")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.threads)))
        return
    import transformers
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads, "
          f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM, "
          f"load average {os.getloadavg()[0]:.1f}")
    path = args.dir or tempfile.mkdtemp(prefix="llama7b-")
    try:
        config = LlamaConfig()
        if args.dir and os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "model.safetensors.index.json")) as f:
                weight_bytes = json.load(f)["metadata"]["total_size"]
        else:
            os.makedirs(path, exist_ok=True)
            start = time.perf_counter()
            weight_bytes = write_weights(path, config)
            print(f"wrote {weight_bytes / 1e9:.2f} GB of random bf16 weights to {path} in "
                  f"{time.perf_counter() - start:.0f} s")
        results = {}
        for which in ("ours", "transformers"):
            results[which] = run_child(which, path, args.threads)
            print(f"{which}: {json.dumps({k: v for k, v in results[which].items() if k != 'tokens'})}")
        report(results, weight_bytes)
    finally:
        if not args.dir:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
