"""lib/optim.py, the optimizer of train.py --low-memory, against torch.optim.AdamW.

With fp32 moments it is torch's AdamW to the bit, though each weight steps inside the backward;
its split Linear layers compute the same products in blocks; with bf16 moments it rounds them
stochastically (unbiased, and a beta2 of 0.999 still moves); a saved and reloaded run is bit-exact.
"""
import copy
import io

import pytest
import torch
from torch import nn

from lib.optim import AdamWInBackward


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    model.token = nn.Parameter(torch.randn(1, 1, 16) * 0.1)  # a 3-d weight, as the task tokens
    return model


def groups(model):
    """train.make_optimizer's groups: decay on matrices and the token, none on biases."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def train(model, optimizer, steps, first=0, autocast=False):
    """`steps` steps on fixed random batches; returns the gradient norms the loop would log."""
    norms = []
    for step in range(first, first + steps):
        for group in optimizer.param_groups:  # a schedule, as LambdaLR sets it (after a load too)
            group["lr"] = 1e-2 / (1 + step)
        torch.manual_seed(100 + step)
        x = torch.randn(4, 5, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model[2](model[1](model[0](x + model.token)))
        y.float().square().mean().backward()
        if isinstance(optimizer, AdamWInBackward):
            assert all(p.grad is None for p in model.parameters())  # every gradient was freed in the backward
            norms.append(optimizer.grad_norm().item())
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def reference(steps=3, autocast=False):
    model = small_model()
    norms = train(model, torch.optim.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95)), steps, autocast=autocast)
    return model, norms


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fp32_moments_are_torch_adamw_to_the_bit(autocast):
    ref, ref_norms = reference(autocast=autocast)
    for chunk in (None, 100):  # whole tensors, then updates in chunks of 100 elements
        model = small_model()
        optimizer = AdamWInBackward(model, groups(model), lr=1e-2, betas=(0.9, 0.95), state_dtype=torch.float32,
                                    chunk=chunk, split=False)
        norms = train(model, optimizer, 3, autocast=autocast)
        assert max_diff(ref, model) == 0.0
        assert norms == pytest.approx(ref_norms, rel=1e-6)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_split_linears_compute_the_same_products_in_blocks(autocast):
    ref, ref_norms = reference(autocast=autocast)
    model = small_model()
    optimizer = AdamWInBackward(model, groups(model), lr=1e-2, betas=(0.9, 0.95), state_dtype=torch.float32, chunk=100)
    assert all("LinearStepInBackward" in str(m.forward) for m in (model[0], model[2]))  # 1024 and 512 weights
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        blocked, whole = model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias)
        assert blocked.dtype == whole.dtype and (blocked - whole).abs().max() < 1e-6 * whole.abs().max()
    norms = train(model, optimizer, 3, autocast=autocast)
    assert max_diff(ref, model) < 1e-6  # the backward's sums, in blocks: another order of rounding
    assert norms == pytest.approx(ref_norms, rel=1e-5)


def test_bf16_moments_stay_near_fp32_ones():
    ref, ref_norms = reference()
    model = small_model()
    optimizer = AdamWInBackward(model, groups(model), lr=1e-2, betas=(0.9, 0.95), chunk=100)
    norms = train(model, optimizer, 3)
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    # each step moves a weight by about lr = 1e-2; bf16 moments change that step by ~2^-8 of it
    assert 0 < max_diff(ref, model) < 3 * 1e-2 * 2**-8 * 3
    assert norms == pytest.approx(ref_norms, rel=1e-2)


def test_stochastic_rounding_keeps_a_slow_second_moment_moving():
    # beta2 0.999: each step changes exp_avg_sq by 0.1%, under half a bf16 step (0.2%); rounded to
    # nearest it would never decrease. Stochastically, it follows the fp32 one.
    def run(state_dtype):
        p = nn.Parameter(torch.zeros(4096))
        optimizer = AdamWInBackward(nn.Module(), [{"params": [p]}], lr=1e-3, betas=(0.9, 0.999), state_dtype=state_dtype)
        for step in range(310):
            (p * (10.0 if step < 10 else 0.1)).sum().backward()  # gradient 10, then 0.1
            optimizer.step()
        return optimizer.state[p]["exp_avg_sq"].float()
    exact, rounded = run(torch.float32), run(torch.bfloat16)
    assert exact.mean() < 0.8 * 100 * (1 - 0.999**10)  # it decays from its value after 10 steps
    assert (rounded.mean() / exact.mean() - 1).abs() < 0.01
    assert (rounded / exact - 1).std() < 0.05  # each element a random walk of roundings: ~4% here


def test_a_reloaded_run_is_bit_exact():
    model = small_model()
    optimizer = AdamWInBackward(model, groups(model), lr=1e-2, betas=(0.9, 0.95), chunk=100)
    train(model, optimizer, 4)

    model2 = small_model()
    optimizer2 = AdamWInBackward(model2, groups(model2), lr=1e-2, betas=(0.9, 0.95), chunk=100)
    train(model2, optimizer2, 2)
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model3 = small_model()
    model3.load_state_dict(saved["model"])
    optimizer3 = AdamWInBackward(model3, groups(model3), lr=1e-2, betas=(0.9, 0.95), chunk=100)
    optimizer3.load_state_dict(copy.deepcopy(saved["optimizer"]))
    assert all(t.dtype == torch.bfloat16 for s in optimizer3.state.values() for k, t in s.items() if k != "step")
    train(model3, optimizer3, 2, first=2)
    assert max_diff(model, model3) == 0.0


def test_torch_adamw_state_loads_into_it_and_back():
    # a run can switch --low-memory on or off on --resume
    model = small_model()
    adamw = torch.optim.AdamW(groups(model), lr=1e-2)
    train(model, adamw, 1)
    low = AdamWInBackward(model, groups(model), lr=1e-2)
    low.load_state_dict(adamw.state_dict())
    assert {s["step"] for s in low.state.values()} == {1}
    train(model, low, 1, first=1)
    back = torch.optim.AdamW(groups(small_model()), lr=1e-2)
    back.load_state_dict(low.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in back.state.values())
