"""The memory planner (python -m workshop.plan): fake tensors against the real allocator.

The planner runs training steps on fake tensors and follows the live storages op by op. On CPU the
same steps on real tensors are recorded by torch.profiler's memory profiler, which sees every
allocation and release the CPU allocator makes; the two peaks must agree within 1%, over several
steps (the optimizer's moments live from step 2 on), accumulation counts, and with --low-memory.
(On a GPU, bench/gpu.sh puts the plan next to torch.cuda.max_memory_allocated.)
"""
import json
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from lib.optim import AdamWInBackward
from workshop import plan as planner
from workshop.hf import hf_config
from cmoe import ConnectorConfig
from model import LlamaConfig, UniMedConfig

LLAMA = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=344, vocab_size=1000, max_seq_len=512)
EVA = planner.EVAConfig(img_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=256)
SMALL_ROUTER = UniMedConfig(connector=ConnectorConfig(experts=3, router_hidden=64))


def allocator_peak(config, dtype, grad_checkpointing, batch_size, text_tokens, steps, grad_accum, low_memory) -> int:
    """Peak bytes of the same steps on real CPU tensors, from the allocator's own record."""
    torch.manual_seed(0)
    model = planner.materialize(planner.meta_model(config, LLAMA, EVA, dtype, dtype), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.set_gradient_checkpointing(grad_checkpointing)
    model.train()
    optimizer = planner.make_optimizer(model, 1e-6, (0.9, 0.95), low_memory)
    batch = planner.plan_batch(batch_size, EVA.img_size, text_tokens, "cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        planner.plan_steps(model, optimizer, batch, steps, grad_accum)
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action in (Action.CREATE, Action.PREEXISTING):  # PREEXISTING: weights, images made before
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


def split_small_linears(monkeypatch):
    """--low-memory with chunks of 2^12 elements, so that the small model's connector Linears are split."""
    make = planner.make_optimizer

    def small_chunks(model, lr, betas, low_memory=False):
        optimizer = make(model, lr, betas)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        return AdamWInBackward(model, groups, lr=lr, betas=betas, chunk=2**12) if low_memory else optimizer
    monkeypatch.setattr(planner, "make_optimizer", small_chunks)


slow = pytest.mark.slow
STEADY = {  # (dtype, checkpointing, steps, grad_accum, low_memory): where the planned peak falls (steps
    # repeat, so the latest step to reach it is named)
    "bf16-checkpointed, 3 steps": ((torch.bfloat16, True, 3, 1, False), "step 3: backward"),
    "bf16-checkpointed, 2 steps x 2 micro-batches": ((torch.bfloat16, True, 2, 2, False), "step 2, micro-batch 2: backward"),
    "bf16-checkpointed, low memory, 3 steps": ((torch.bfloat16, True, 3, 1, True), "step 3: backward"),
    "bf16-checkpointed, 2 steps x 3 micro-batches": pytest.param(
        (torch.bfloat16, True, 2, 3, False), "step 2, micro-batch 3: backward", marks=slow),
    "fp32, 3 steps": pytest.param((torch.float32, False, 3, 1, False), "step 3: forward", marks=slow),
    "fp32, 2 steps x 2 micro-batches": pytest.param(
        (torch.float32, False, 2, 2, False), "step 2, micro-batch 2: forward", marks=slow),
    "fp32, low memory, 3 steps": pytest.param((torch.float32, False, 3, 1, True), "step 3: forward", marks=slow),
}


@pytest.mark.parametrize("case, where", STEADY.values(), ids=STEADY.keys())
def test_plan_matches_the_allocator_step_after_step(case, where, monkeypatch):
    # long rows and a small router: the peak falls in forward or backward, where activations count,
    # and from step 2 on the moments made in step 1 come on top of them
    dtype, checkpointing, steps, grad_accum, low_memory = case
    split_small_linears(monkeypatch)
    shape = dict(batch_size=8, text_tokens=192, grad_accum=grad_accum)
    plan = planner.plan_memory(SMALL_ROUTER, LLAMA, EVA, dtype=dtype, vit_dtype=dtype, autocast=None,
                               grad_checkpointing=checkpointing, steps=steps, low_memory=low_memory, **shape)
    real = allocator_peak(SMALL_ROUTER, dtype, checkpointing, **shape, steps=steps, low_memory=low_memory)
    assert plan["phase"] == where
    assert plan["parts"]["activations"] > 0.3 * plan["peak"] and plan["parts"]["AdamW moments"] > 0
    assert plan["peak"] > plan["first_step"]  # step 1 alone would plan low
    assert abs(plan["peak"] / real - 1) < 0.01, (plan["peak"], real, plan["peak"] / real)
    if steps == 3:  # step 3 repeats step 2: STEPS = 2 plans the steady state
        assert plan["phase_peaks"]["step 3: backward"] == plan["phase_peaks"]["step 2: backward"]


def test_parts_add_up_and_name_the_weights_and_adamw(monkeypatch):
    # the default router (4 x its input wide) dominates: the peak holds every gradient and both moments
    # (fused AdamW adds no temporary, so it falls at the end of step 2's backward)
    config = UniMedConfig()
    plan = planner.plan_memory(config, LLAMA, EVA, dtype=torch.bfloat16, vit_dtype=torch.bfloat16, autocast=None,
                             grad_checkpointing=True, batch_size=4, text_tokens=64)
    parts = plan["parts"]
    assert sum(parts.values()) == plan["peak"] and min(parts.values()) >= 0
    assert plan["phase"] in ("step 2: backward", "step 2: optimizer step")
    model = planner.meta_model(config, LLAMA, EVA, torch.bfloat16, torch.bfloat16)
    nbytes = {flag: sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad == flag)
              for flag in (False, True)}
    assert parts["frozen weights"] == nbytes[False]
    assert parts["trainable weights"] == nbytes[True]
    # fp32 exp_avg and exp_avg_sq per trained tensor (+ 4-byte step counters); a caption batch
    # leaves the other tasks' tokens without a gradient, hence without AdamW state
    assert 1.9 * nbytes[True] < parts["AdamW moments"] <= 2 * nbytes[True] + 4 * 10_000
    assert 0.95 * nbytes[True] < parts["gradients"] <= nbytes[True]
    # --low-memory (in chunks as small against this model as 2^22 against the real one): bf16 moments,
    # no whole gradient of the router's 4 x wide first layer (split), the peak in the backward
    split_small_linears(monkeypatch)
    low = planner.plan_memory(config, LLAMA, EVA, dtype=torch.bfloat16, vit_dtype=torch.bfloat16, autocast=None,
                              grad_checkpointing=True, batch_size=4, text_tokens=64, low_memory=True)
    assert 0.95 * nbytes[True] < low["parts"]["AdamW moments"] <= nbytes[True]  # 2 x 2 bytes a weight
    assert low["parts"]["gradients"] < 0.05 * nbytes[True] and low["phase"] == "step 2: backward"
    assert low["peak"] < plan["peak"] - 1.5 * nbytes[True]  # half the moments and (nearly) every gradient


def test_official_precision_keeps_fp16_copies_of_the_llama_for_backward():
    plan = planner.plan_memory(SMALL_ROUTER, LLAMA, EVA, **planner.OFFICIAL_PRECISION, batch_size=2, text_tokens=32)
    llama_fp16 = sum(p.numel() * 2 for n, p in planner.meta_model(
        SMALL_ROUTER, LLAMA, EVA, torch.float32, torch.float16).named_parameters()
        if n.startswith("llama.") and p.ndim == 2 and ".lora_" not in n and "embed" not in n)
    assert plan["weight_copies_after_forward"] >= llama_fp16


def test_plan_reads_only_config_json(tmp_path, monkeypatch, capsys):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(hf_config(LLAMA)))
    monkeypatch.chdir(tmp_path)
    plans = planner.main(["--llama", str(llama), "--router-hidden", "64"])
    assert os.listdir(tmp_path) == ["llama"]  # no demo built, nothing written
    out = capsys.readouterr().out
    assert "fits 24 / 40 / 48 / 80 GB" in out and "official: fp32 LLaMA, fp16 autocast" in out
    ours, low_memory, official = plans.values()
    assert "peak reached in" in out and "step 2: " in out
    assert official["parts"]["frozen weights"] > ours["parts"]["frozen weights"]  # fp32 LLaMA
    with pytest.raises(SystemExit, match="config.json not found"):
        planner.main(["--llama", str(tmp_path)])


@pytest.mark.slow
def test_plan_of_the_demo_plans_the_full_size_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plans = planner.main([])
    assert os.listdir(tmp_path) == []
    ours, low_memory, official = plans.values()
    G = 2**30
    assert 14 < ours["parts"]["frozen weights"] / G < 15  # 6.74B LLaMA + 1.0B ViT in bf16
    assert low_memory["peak"] <= 21.3 * G  # the paper's configuration on a 24 GB card
    assert [planner.fits(ours["peak"], gb) for gb in planner.CARDS_GB] == [False, True, True, True]
    assert [planner.fits(low_memory["peak"], gb) for gb in planner.CARDS_GB] == [True, True, True, True]
    assert [planner.fits(official["peak"], gb) for gb in planner.CARDS_GB] == [False, False, False, True]
    # --grad-accum 2: the first micro-batch's gradients live through the second; --low-memory refused
    accum = planner.main(["--grad-accum", "2"])
    assert list(accum) == [next(iter(plans)), "official: fp32 LLaMA, fp16 autocast"]
