"""The memory planner (python -m workshop.plan): fake tensors against the real allocator.

The planner runs one training step on fake tensors and follows the live storages op by op. On CPU
the same step on real tensors is recorded by torch.profiler's memory profiler, which sees every
allocation and release the CPU allocator makes; the two peaks must agree. (On a GPU, bench/gpu.sh
puts the plan next to torch.cuda.max_memory_allocated.)
"""
import json
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from workshop import plan as planner
from workshop.hf import hf_config
from cmoe import ConnectorConfig
from model import LlamaConfig, UniMedConfig

LLAMA = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=344, vocab_size=1000, max_seq_len=512)
EVA = planner.EVAConfig(img_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=256)
SMALL_ROUTER = UniMedConfig(connector=ConnectorConfig(experts=3, router_hidden=64))


def allocator_peak(config, dtype, grad_checkpointing, batch_size, text_tokens) -> int:
    """Peak bytes of the same step on real CPU tensors, from the allocator's own record."""
    torch.manual_seed(0)
    model = planner.materialize(planner.meta_model(config, LLAMA, EVA, dtype, dtype), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.set_gradient_checkpointing(grad_checkpointing)
    model.train()
    optimizer = planner.make_optimizer(model, 1e-6, (0.9, 0.95))
    batch = planner.plan_batch(batch_size, EVA.img_size, text_tokens, "cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        planner.plan_step(model, optimizer, batch)
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action in (Action.CREATE, Action.PREEXISTING):  # PREEXISTING: weights, images made before
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype, checkpointing", [
    (torch.bfloat16, True), pytest.param(torch.float32, False, marks=pytest.mark.slow)], ids=["bf16-checkpointed", "fp32"])
def test_plan_matches_the_allocator(dtype, checkpointing):
    # long rows and a small router: the peak falls in forward or backward, where activations count
    shape = dict(batch_size=8, text_tokens=192)
    plan = planner.plan_memory(SMALL_ROUTER, LLAMA, EVA, dtype=dtype, vit_dtype=dtype, autocast=None,
                             grad_checkpointing=checkpointing, **shape)
    real = allocator_peak(SMALL_ROUTER, dtype, checkpointing, **shape)
    assert plan["phase"] in ("forward", "backward")
    assert plan["parts"]["activations"] > 0.3 * plan["peak"]
    assert abs(plan["peak"] / real - 1) < 0.10, (plan["peak"], real)


def test_parts_add_up_and_name_the_weights_and_adamw():
    # the default router (4 x its input wide) dominates: the peak is AdamW's step
    config = UniMedConfig()
    plan = planner.plan_memory(config, LLAMA, EVA, dtype=torch.bfloat16, vit_dtype=torch.bfloat16, autocast=None,
                             grad_checkpointing=True, batch_size=4, text_tokens=64)
    parts = plan["parts"]
    assert sum(parts.values()) == plan["peak"] and min(parts.values()) >= 0
    assert plan["phase"] == "optimizer step"
    model = planner.meta_model(config, LLAMA, EVA, torch.bfloat16, torch.bfloat16)
    nbytes = {flag: sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad == flag)
              for flag in (False, True)}
    assert parts["frozen weights"] == nbytes[False]
    assert parts["trainable weights"] == nbytes[True]
    # fp32 exp_avg and exp_avg_sq per trained tensor (+ 4-byte step counters); a caption batch
    # leaves the other tasks' tokens without a gradient, hence without AdamW state
    assert 1.9 * nbytes[True] < parts["AdamW state"] <= 2 * nbytes[True] + 4 * 10_000
    assert 0.95 * nbytes[True] < parts["gradients"] <= nbytes[True]


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
    ours, official = plans.values()
    assert official["parts"]["frozen weights"] > ours["parts"]["frozen weights"]  # fp32 LLaMA
    with pytest.raises(SystemExit, match="config.json not found"):
        planner.main(["--llama", str(tmp_path)])


@pytest.mark.slow
def test_plan_of_the_demo_plans_the_full_size_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plans = planner.main([])
    assert os.listdir(tmp_path) == []
    ours, official = plans.values()
    G = 2**30
    assert 14 < ours["parts"]["frozen weights"] / G < 15  # 6.74B LLaMA + 1.0B ViT in bf16
    assert [planner.fits(ours["peak"], gb) for gb in planner.CARDS_GB] == [False, True, True, True]
    assert [planner.fits(official["peak"], gb) for gb in planner.CARDS_GB] == [False, False, False, True]
