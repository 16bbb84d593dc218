"""The shape trace: every stage of one training forward of the full-size Uni-Med, read from the code.

    python -m workshop.shapes                               # words counted as tokens: no files
    python -m workshop.shapes --tokenizer tokenizer.model   # LLaMA-2's tokenizer counts them
    python -m workshop.shapes --summary                     # parameter counts, by part

The full-size model (EVA ViT-G/14, Connector-MoE, LLaMA-2-7B with LoRA) is built on the `meta` device,
which gives tensors shapes and dtypes but no memory and no values, and runs one training forward of a
batch of two vqa samples. Forward hooks record what each stage's module takes in or gives out; the
table lists them in the order the data flows, with the paper's equation where one applies. The loss
has a shape (a scalar) but no value. README.md's diagram is tested against this trace, so the two
cannot drift apart.
"""
import argparse
from typing import Optional

import torch

from model import Llama, LlamaConfig, Tokenizer, UniMed, UniMedConfig
from vision import EVAConfig, EVAViT

class WordTokenizer:
    """Stands in for tokenizer.model where only lengths matter (the shape trace, the memory plan):
    one token per word, so every length is a stated count."""
    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [3] * len(text.split()) + [self.eos_id] * eos


# One vqa batch with the official VQA training template; answers short as Slake's are.
TRACE_BATCH = [("[vqa] Based on the image, respond to this question with a short answer: "
                "is the lesion in the left lung?", "yes"),
               ("[vqa] which organ is abnormal?", "the liver")]

TRACE = [  # (stage, module, its input or output, paper equation), in the order the data flows
    ("image", "vit", "in", ""),
    ("ViT-G/14: CLS + 16x16 patch tokens", "vit", "out", ""),
    ("ln_vision", "ln_vision", "out", ""),
    ("CLS dropped", "connector", "in", ""),
    ("resampler: f_ag (the experts' input)", "connector.experts.0", "in", "Eq. 7"),
    ("router input [task token, f_ag]", "connector.router", "in", "Eq. 8"),
    ("router weights w", "connector.router", "out", "Eq. 8, 14"),
    ("expert E{k}(f_ag)", "connector.experts.{i}", "out", "Eq. 6"),  # a row per expert
    ("experts mixed: sum_k w_k E_k(f_ag)", "connector", "out", "Eq. 9"),
    ("prompt embeddings, image spliced in", "llama", "in", ""),
    ("block 0: attn_norm", "llama.layers.0.attn_norm", "out", ""),
    ("block 0: q_proj + LoRA", "llama.layers.0.attn.q_proj", "out", ""),
    ("block 0: k_proj + LoRA", "llama.layers.0.attn.k_proj", "out", ""),
    ("block 0: v_proj + LoRA", "llama.layers.0.attn.v_proj", "out", ""),
    ("block 0: attention, heads merged", "llama.layers.0.attn.o_proj", "in", ""),
    ("block 0: o_proj + LoRA", "llama.layers.0.attn.o_proj", "out", ""),
    ("block 0: mlp_norm", "llama.layers.0.mlp_norm", "out", ""),
    ("block 0: gate_proj + LoRA", "llama.layers.0.mlp.gate_proj", "out", ""),
    ("block 0: up_proj + LoRA", "llama.layers.0.mlp.up_proj", "out", ""),
    ("block 0: down_proj + LoRA", "llama.layers.0.mlp.down_proj", "out", ""),
    ("block 0 output (and of blocks 1-31)", "llama.layers.0", "out", ""),
    ("final norm", "llama.norm", "out", ""),
    ("logits", "llama.lm_head", "out", ""),
    ("loss (a value needs weights)", "", "out", ""),
]


def trace(config: Optional[UniMedConfig] = None, tokenizer=None, batch=TRACE_BATCH) -> list[dict]:
    """One training forward of the full-size Uni-Med (ViT-G, LLaMA-2-7B) on `meta` -> one row per
    stage of TRACE: {stage, shape ("[B, T, 4096]"), size, dtype, module, eq}, B the batch and T the
    padded sequence. Stages of modules this configuration lacks are left out."""
    with torch.device("meta"):
        model = UniMed(config or UniMedConfig(), Llama(LlamaConfig()), EVAViT(EVAConfig()),
                       tokenizer or WordTokenizer())
    modules = dict(model.named_modules())
    experts = len(modules["connector.experts"]) if "connector.experts" in modules else 0
    stages = [(stage.format(k=i + 1), name.format(i=i), side, eq) for stage, name, side, eq in TRACE
              for i in (range(experts) if "{i}" in name else [0])  # the expert row, once per expert
              if name.format(i=i) in modules]
    seen, hooks = {}, []

    def keep(stage, values):  # the first tensor a module takes or gives (some give tuples)
        seen.setdefault(stage, next(v for v in values if torch.is_tensor(v)))
    for stage, name, side, _ in stages:
        if side == "in":
            hooks.append(modules[name].register_forward_pre_hook(
                lambda m, args, kwargs, s=stage: keep(s, [*args, *kwargs.values()]), with_kwargs=True))
        else:
            hooks.append(modules[name].register_forward_hook(
                lambda m, args, out, s=stage: keep(s, out if isinstance(out, tuple) else [out])))
    instructions, answers = map(list, zip(*batch))
    task = instructions[0][1:instructions[0].index("]")]  # instructions start with "[task]"
    images = torch.empty(len(batch), 3, model.image_size, model.image_size, device="meta")
    model.train()
    try:
        model(images, instructions, answers, task)
    finally:
        for h in hooks:
            h.remove()
    B, T = len(batch), seen["logits"].shape[1]
    rows = []
    for stage, name, side, eq in stages:
        size = list(seen[stage].shape)
        dims = ["B" if i == 0 and d == B else "T" if i == 1 and d == T and name.startswith("llama") else str(d)
                for i, d in enumerate(size)]
        rows.append({"stage": stage, "shape": f"[{', '.join(dims)}]", "size": size,
                     "dtype": str(seen[stage].dtype).removeprefix("torch."), "eq": eq,
                     "module": f"{'into ' if side == 'in' else ''}{name} ({type(modules[name]).__name__})"
                               if name else "UniMed.forward (cross-entropy)"})
    return rows


def print_trace(tokenizer_path: Optional[str] = None) -> None:
    """The trace as a table, with what B, T and the dtypes are."""
    rows = trace(tokenizer=Tokenizer(tokenizer_path) if tokenizer_path else None)
    T = next(r["size"][1] for r in rows if r["stage"] == "logits")
    counted = f"counted by {tokenizer_path}" if tokenizer_path else \
        "one per word, a stated count (no --tokenizer given)"
    print(f"Uni-Med at full size on the meta device (no weights): one training forward of {len(TRACE_BATCH)} "
          f"vqa samples.\nB = {len(TRACE_BATCH)} samples; T = {T} tokens: <s>, the prompt around "
          f"the image embeddings, the answer and </s>,\nright-padded to the longer row. Text tokens: {counted}.\n"
          f"dtype: a float32 base, as on CPU (on CUDA a bf16 base runs under autocast, which meta lacks).\n")
    print(f"{'stage':<38}{'shape':<19}{'dtype':<9}{'module':<46}eq.")
    for r in rows:
        print(f"{r['stage']:<38}{r['shape']:<19}{r['dtype']:<9}{r['module']:<46}{r['eq']}".rstrip())


def parameter_summary(model: UniMed) -> dict[str, tuple[int, int]]:
    """Parameters by part of the model: {part: (trainable, frozen)}."""
    def part(name: str) -> str:
        if name.startswith("connector."):
            return {"experts": "connector experts", "proj": "connector experts", "router": "router",
                    "task_tokens": "task tokens"}[name.split(".")[1]]
        if name.startswith("llama."):
            return "LoRA" if ".lora_" in name or ".router." in name else "LLaMA base"
        return {"vit": "EVA ViT", "ln_vision": "ln_vision"}[name.split(".")[0]]
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        counts.setdefault(part(name), [0, 0])[0 if p.requires_grad else 1] += p.numel()
    return {k: tuple(v) for k, v in counts.items()}


def print_summary(config: UniMedConfig) -> None:
    """Build the full-size Uni-Med (ViT-G + LLaMA-2-7B) on `meta` and print its parameter counts."""
    with torch.device("meta"):
        model = UniMed(config, Llama(LlamaConfig()), EVAViT(EVAConfig()), tokenizer=None)
    rows = parameter_summary(model)
    print(f"{'part':<20}{'trainable':>16}{'frozen':>16}")
    for name, (trainable, frozen) in rows.items():
        print(f"{name:<20}{trainable:>16,}{frozen:>16,}")
    print(f"{'total':<20}{sum(t for t, _ in rows.values()):>16,}{sum(f for _, f in rows.values()):>16,}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="LLaMA-2's tokenizer.model, to count the prompt's tokens "
                        "(default: one token per word, a stated count)")
    parser.add_argument("--summary", action="store_true",
                        help="print the parameter counts of the full-size model by part instead")
    args = parser.parse_args(argv)
    print_summary(UniMedConfig()) if args.summary else print_trace(args.tokenizer)


if __name__ == "__main__":
    main()
