"""The memory planner: will a training run fit on my card? Answered without weights, data or a GPU.

    python -m workshop.plan [train.py's flags]      # e.g. --router-hidden 1408, --grad-accum 2, --llama DIR

It builds the full-size model for the flags (EVA ViT-G + LLaMA-2-7B, or the LLaMA of --llama's
config.json) on fake tensors, which have shapes and dtypes but no memory, runs real training steps
on them (each: --grad-accum forwards and backwards, gradient norm, AdamW) and follows the bytes of
the live tensor storages op by op: what the allocator must hold. It plans STEPS steps, because
from step 2 on AdamW's moments, made in step 1, stay live through the forward and the backward;
later steps repeat step 2. It plans the flags with and without --low-memory (lib/optim.py). The
CUDA context and the caching allocator's fragmentation come on top, hence the margin in `fits`.

The step's shape is the paper's: batch 4, the flags' image tokens (64), and PLAN_TEXT_TOKENS of text
per row. A batch is padded to its longest row, and the longest batches of the mixture are report
generation (MIMIC-CXR, MedPix): a report is cut at 50 words (spec section 6), at most ~100 LLaMA
tokens at 2 tokens a word, after ~21 tokens of chat template and instruction, with BOS and </s>.
QA's 50-word questions come to ~145 text tokens but carry no image (64 tokens fewer).
"""
import os
import sys
import weakref
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from cmoe import ConnectorConfig
from lib.files import assign, read_json
from lib.optim import AdamWInBackward
from model import Llama, LlamaConfig, UniMed, UniMedConfig, build_prompt
from train import make_optimizer, parse_args, unimed_config
from vision import EVAConfig, EVAViT
from workshop.shapes import WordTokenizer

PLAN_TEXT_TOKENS = 128
STEPS = 2  # step 1 makes AdamW's moments; step 2 is every later step
CARDS_GB = (24, 40, 48, 80)
OFFICIAL_PRECISION = dict(dtype=torch.float32, vit_dtype=torch.float16, autocast=torch.float16,
                          grad_checkpointing=False)  # spec section 8: fp32 LLaMA master, fp16 autocast


def num_image_tokens(connector: ConnectorConfig, vit: EVAConfig) -> int:
    """Visual tokens per image that reach the LLaMA (64 for ViT-G at 224 with rate 4)."""
    patches = vit.grid ** 2
    return patches if connector.resampler == "none" else patches // connector.rate


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


def plan_steps(model: UniMed, optimizer, batch, steps: int = 1, grad_accum: int = 1, phase=lambda name: None) -> None:
    """The work of `steps` train.py steps: each, grad_accum forwards and backwards of `batch` (images,
    instructions, answers), the gradient norm, AdamW. `phase(name)` is called as each part begins."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(1, steps + 1):
        for micro in range(1, grad_accum + 1):
            at = f"step {step}" + (f", micro-batch {micro}" if grad_accum > 1 else "")
            phase(f"{at}: forward")
            loss = model(*batch, "caption")[0]
            phase(f"{at}: backward")
            (loss / grad_accum).backward()
            del loss
        phase(f"step {step}: optimizer step")
        if isinstance(optimizer, AdamWInBackward):
            optimizer.grad_norm()
        else:
            torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


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
        """The peak bytes, the last event that reached it (steps repeat: the latest), and each phase's own peak."""
        now, peak, at, phase_peaks = 0, 0, 0, {}
        starts = dict(self.phases)
        name = None
        for i, (_, delta) in enumerate(self.events):
            name = starts.get(i, name)
            now += delta
            if now >= peak:
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
                grad_checkpointing: bool, batch_size: int, text_tokens: int, device: str = "cpu",
                steps: int = STEPS, grad_accum: int = 1, low_memory: bool = False) -> dict:
    """Bytes at the peak of `steps` training steps, in parts that add up to it, measured on fake
    tensors, and the step and phase where the peak falls.

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
        grads = set()  # every whole gradient, seen as it is accumulated (before --low-memory frees it)

        def seen(p):
            if p.grad is not None:  # None: a weight --low-memory steps in blocks, with no whole gradient
                grads.add(mem.track(p.grad))
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(seen)
        optimizer = make_optimizer(model, 1e-6, (0.9, 0.95), low_memory)
        plan_steps(model, optimizer, plan_batch(batch_size, vit.img_size, text_tokens, device), steps, grad_accum,
                   mem.phase)
        # What has a name: the weights, gradients and moments; anything else live at the peak was a
        # temporary, or an activation if a forward made it and left it for its backward.
        params = list(model.parameters())
        named = {"frozen weights": {mem.track(p) for p in params if not p.requires_grad},
                 "trainable weights": {mem.track(p) for p in params if p.requires_grad},
                 "gradients": grads,
                 "AdamW moments": {mem.track(t) for state in optimizer.state.values() for t in state.values()
                                   if torch.is_tensor(t)}}
    peak, at, phase_peaks = mem.peaks()
    starts = {name: start for start, name in mem.phases}
    kept = [mem.live(start, starts[name.replace("forward", "backward")]) - set().union(*named.values())
            for start, name in mem.phases if name.endswith("forward")]  # by each forward, for its backward
    at_peak = mem.live(0, at + 1)
    parts = {part: sum(mem.nbytes[s] for s in serials & at_peak) for part, serials in named.items()}
    parts["activations"] = sum(mem.nbytes[s] for s in set().union(*kept) & at_peak)
    parts["temporaries"] = peak - sum(parts.values())
    return {"parts": parts, "peak": peak, "phase_peaks": phase_peaks,
            "phase": [name for start, name in mem.phases if start <= at][-1],  # the step and phase of the peak
            "first_step": max(v for k, v in phase_peaks.items() if k.startswith(("step 1:", "step 1,"))),
            "after_forward": sum(mem.nbytes[s] for s in kept[-1]),
            "weight_copies_after_forward": sum(mem.nbytes[s] for s in kept[-1] & mem.weight_copies)}


def fits(peak: int, card_gb: int) -> bool:
    """Room for the peak on a card of card_gb GiB, with 10% for the caching allocator's
    fragmentation and 0.5 GiB for the CUDA context (neither is counted in the peak)."""
    return peak * 1.1 + 0.5 * 2**30 <= card_gb * 2**30


def main(argv=None) -> dict:
    """Plan the flags' training at full size, with and without --low-memory, and at the official
    precision, and print the parts of each peak and the cards it fits. Reads no weights or data
    (only --llama's config.json, when given)."""
    args = parse_args(argv, plan=True)
    llama = LlamaConfig()
    if args.llama:
        path = os.path.join(args.llama, "config.json")
        if not os.path.exists(path):
            sys.exit(f"workshop.plan: {path} not found (--llama names an HF LLaMA-2 directory)")
        llama = LlamaConfig.from_hf(read_json(path, "LLaMA config.json"))
    vit, config = EVAConfig(), unimed_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fake tensors: no memory is used on either
    image_tokens = num_image_tokens(config.connector, vit)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = dict(batch_size=args.batch_size, text_tokens=PLAN_TEXT_TOKENS, device=device, grad_accum=args.grad_accum)
    ours = dict(dtype=dtype, vit_dtype=dtype, autocast=None, grad_checkpointing=args.grad_checkpointing, **shape)
    plans = {f"ours: {args.dtype}{', checkpointed' if args.grad_checkpointing else ''}": plan_memory(config, llama, vit, **ours)}
    if args.grad_accum == 1:  # train.py refuses --low-memory with --grad-accum
        plans["ours, --low-memory"] = plan_memory(config, llama, vit, **ours, low_memory=True)
    plans["official: fp32 LLaMA, fp16 autocast"] = plan_memory(config, llama, vit, **OFFICIAL_PRECISION, **shape)
    c = config.connector
    print(f"Memory plan of training steps 1 to {STEPS} (from step 2 on, AdamW's moments stay live through the "
          f"forward and backward) on fake tensors ({device}), in GiB")
    print(f"model: EVA ViT-G/14 ({vit.depth} blocks) + LLaMA dim {llama.dim} x {llama.n_layers} layers"
          f"{'' if args.llama else ' (LLaMA-2-7B)'}; connector {c.connector}"
          f"{f', {c.experts} experts, {c.router} router' if c.connector == 'moe' else ''}; "
          f"LoRA r {config.lora_r}{' x 5 experts' if config.lora_experts > 1 else ''}")
    print(f"batch {args.batch_size} x ({image_tokens} image + {PLAN_TEXT_TOKENS} text) tokens: the longest "
          f"batches, 50-word reports (workshop/plan.py)" + (f"; {args.grad_accum} micro-batches a step"
                                                               if args.grad_accum > 1 else ""))
    G = 2**30
    rows = [(part, [f"{p['parts'][part] / G:.2f}" for p in plans.values()]) for part in next(iter(plans.values()))["parts"]]
    rows += [("peak", [f"{p['peak'] / G:.2f}" for p in plans.values()]),
             ("peak reached in", [p["phase"] for p in plans.values()]),
             ("peak of step 1", [f"{p['first_step'] / G:.2f}" for p in plans.values()]),
             ("kept by forward", [f"{p['after_forward'] / G:.2f} ({p['weight_copies_after_forward'] / G:.2f} weight copies)"
                                  for p in plans.values()]),
             (f"fits {' / '.join(map(str, CARDS_GB))} GB", [" / ".join("yes" if fits(p["peak"], gb) else "no"
                                                               for gb in CARDS_GB) for p in plans.values()])]
    print(f"{'':24}" + "".join(f"{name:>37}" for name in plans))
    for label, cells in rows:
        print(f"{label:24}" + "".join(f"{cell:>37}" for cell in cells))
    print("fits: peak + 10% for allocator fragmentation + 0.5 GiB CUDA context; DDP adds its gradient buckets"
          + ("; --low-memory is refused with --grad-accum" if args.grad_accum > 1 else ""))
    return plans


if __name__ == "__main__":
    main()
