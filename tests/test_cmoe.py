"""Connector-MoE: resamplers, routers, task tokens, experts, and the spec's parameter counts."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from cmoe import (CONNECTORS, IMAGE_TASKS, RESAMPLERS, ROUTER_INPUTS, ROUTERS, Connector,
                  ConnectorConfig, resample, token_of_patch)

SMALL = dict(vit_width=6, llm_width=16, router_hidden=12)


def small(**kw) -> Connector:
    torch.manual_seed(0)
    return Connector(ConnectorConfig(**{**SMALL, **kw}))


def features(B=2, W=6, seed=1):
    return torch.randn(B, 256, W, generator=torch.Generator().manual_seed(seed))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- shapes

ALL_CONFIGS = (
    [dict(resampler=r, connector=c) for r in RESAMPLERS for c in ("linear", "mlp")]
    + [dict(resampler=r, connector="moe", router=t, router_input=i)
       for r, t, i in itertools.product(RESAMPLERS, ROUTERS, ROUTER_INPUTS)])


@pytest.mark.parametrize("kw", ALL_CONFIGS, ids=lambda kw: "-".join(kw.values()))
def test_shapes_every_combination(kw):
    connector = small(**kw)
    tokens = {"projection": 64, "avgpool": 64, "maxpool": 64, "none": 256}[kw["resampler"]]
    embeds, weights = connector(features(), "caption")
    assert embeds.shape == (2, tokens, 16)
    if kw["connector"] == "moe":
        assert weights.shape == (2, tokens, 5) and weights.dtype == torch.float32
        assert torch.allclose(weights.sum(-1), torch.ones(2, tokens), atol=1e-6)
    else:
        assert weights is None


def test_projection_rate_widths():
    for rate, tokens in ((1, 256), (2, 128), (4, 64)):
        embeds, weights = small(rate=rate)(features(), "vqa")
        assert embeds.shape == (2, tokens, 16) and weights.shape == (2, tokens, 5)


# ------------------------------------------------------------------------------------------ resampler

def test_projection_concatenates_consecutive_tokens():
    x = torch.arange(2 * 256 * 3).reshape(2, 256, 3)
    y = resample(x, "projection", 4)
    assert y.shape == (2, 64, 12)
    # output token 1 = input tokens 4, 5, 6, 7 side by side (a row run, not a 2x2 window)
    assert y[0, 1].tolist() == list(range(12, 24))
    assert y[1, 63].tolist() == list(range(256 * 3 + 252 * 3, 256 * 3 + 256 * 3))
    for j in (0, 17, 40):
        assert torch.equal(y[1, j], torch.cat([x[1, 4 * j + i] for i in range(4)]))


@pytest.mark.parametrize("method", ["avgpool", "maxpool"])
def test_pooling_on_a_hand_made_grid(method):
    # token (row i, column j) of the 16x16 grid carries 100 i + j in channel 0 and a random value in channel 1
    x = torch.zeros(1, 256, 2)
    for i in range(16):
        for j in range(16):
            x[0, 16 * i + j, 0] = 100 * i + j
    x[0, :, 1] = torch.randn(256)
    y = resample(x, method, 4)
    assert y.shape == (1, 64, 2)
    for I in range(8):
        for J in range(8):
            window = [16 * (2 * I + di) + 2 * J + dj for di in (0, 1) for dj in (0, 1)]
            if method == "avgpool":
                assert y[0, 8 * I + J, 0] == 100 * (2 * I + 0.5) + 2 * J + 0.5
                assert torch.allclose(y[0, 8 * I + J, 1], x[0, window, 1].mean())
            else:
                assert y[0, 8 * I + J, 0] == 100 * (2 * I + 1) + 2 * J + 1
                assert y[0, 8 * I + J, 1] == x[0, window, 1].max()


def test_none_is_identity():
    x = features()
    assert torch.equal(resample(x, "none", 4), x)


@pytest.mark.parametrize("method, rate", [("projection", 4), ("projection", 2), ("avgpool", 4),
                                          ("maxpool", 4), ("none", 4)])
def test_token_of_patch_is_what_resample_groups(method, rate):
    # Raising one patch far above the rest changes exactly the output token that covers it
    x = torch.randn(1, 256, 3, generator=torch.Generator().manual_seed(0))
    y = resample(x, method, rate)
    owner = token_of_patch(method, rate, 256)
    assert owner.shape == (256,) and int(owner.max()) == y.shape[1] - 1
    for p in range(256):
        bumped = x.clone()
        bumped[0, p] += 100.0
        changed = (resample(bumped, method, rate) != y).any(-1)[0].nonzero().flatten().tolist()
        assert changed == [int(owner[p])], p


# --------------------------------------------------------------------------------------------- routers

@pytest.mark.parametrize("router", ["soft", "constant"])
def test_soft_and_constant_weights_sum_to_one(router):
    for task in IMAGE_TASKS:
        _, w = small(router=router)(features(B=3), task)
        assert torch.allclose(w.sum(-1), torch.ones(3, 64), atol=1e-6)
        assert (w > 0).all()
        if router == "constant":
            assert torch.equal(w, torch.full_like(w, 1 / 5))


def test_hard_is_one_hot_on_the_task():
    connector = small(router="hard")
    for i, task in enumerate(IMAGE_TASKS):
        embeds, w = connector(features(), task)
        assert torch.equal(w, F.one_hot(torch.full((2, 64), i), 5).float())
        assert torch.allclose(embeds, connector.experts[i](resample(features(), "projection", 4)))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("router_input", ROUTER_INPUTS)
def test_sparse_keeps_exactly_k_experts(k, router_input):
    connector = small(router="sparse", top_k=k, router_input=router_input)
    _, w = connector(features(), "refer")
    assert ((w > 0).sum(-1) == k).all()
    assert torch.allclose(w.sum(-1), torch.ones(2, 64), atol=1e-6)
    # the kept experts are those with the k largest logits, weighted by softmax over just those
    x = resample(features(), "projection", 4)
    logits = connector.router.fc2(F.gelu(connector.router.fc1(connector.router_input(x, "refer"))))
    top, index = logits.topk(k, dim=-1)
    assert torch.allclose(w.gather(-1, index), top.softmax(-1), atol=1e-6)


def test_soft_router_and_weighted_sum_by_hand():
    """Eq. 14 and Eq. 9 written out per token, with the router input [task token, token]."""
    connector = small()
    x_in = features(B=1)
    embeds, w = connector(x_in, "identify")
    x = resample(x_in, "projection", 4)[0]  # [64, 24]
    task_token = connector.task_tokens["identify"].reshape(-1)
    r = connector.router
    for t in (0, 31, 63):
        g = r.fc2(F.gelu(r.fc1(torch.cat([task_token, x[t]]))))
        want_w = torch.sigmoid(g) / torch.sigmoid(g).sum()
        want = sum(want_w[k] * connector.experts[k](x[t]) for k in range(5))
        assert torch.allclose(w[0, t], want_w, atol=1e-6)
        assert torch.allclose(embeds[0, t], want, atol=1e-5)


def test_linear_and_mlp_connectors_by_hand():
    x = resample(features(), "projection", 4)
    lin = small(connector="linear")
    assert torch.allclose(lin(features(), "vqa")[0], x @ lin.proj.weight.T + lin.proj.bias, atol=1e-6)
    mlp = small(connector="mlp")
    hidden = F.gelu(F.linear(x, mlp.proj.fc1.weight, mlp.proj.fc1.bias))
    want = F.linear(hidden, mlp.proj.fc2.weight, mlp.proj.fc2.bias)
    assert torch.allclose(mlp(features(), "vqa")[0], want, atol=1e-6)


def test_task_input_router_depends_on_task_only():
    connector = small(router_input="task")
    _, w1 = connector(features(seed=1), "caption")
    _, w2 = connector(features(seed=2), "caption")
    _, w3 = connector(features(seed=1), "cls")
    assert torch.allclose(w1, w2) and torch.allclose(w1, w1[:1, :1].expand_as(w1))
    assert not torch.allclose(w1, w3)


# ----------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("router", ["soft", "sparse"])
def test_gradients_reach_router_task_token_and_experts(router):
    connector = small(router=router, top_k=2)
    embeds, _ = connector(features(), "caption")
    (embeds * torch.randn_like(embeds)).sum().backward()
    assert connector.router.fc1.weight.grad.abs().sum() > 0
    assert connector.router.fc2.weight.grad.abs().sum() > 0
    assert connector.task_tokens["caption"].grad.abs().sum() > 0
    # only the batch's task token: the others have no gradient at all (AdamW then skips them)
    assert all(connector.task_tokens[t].grad is None for t in IMAGE_TASKS if t != "caption")
    for expert in connector.experts:
        assert expert.fc1.weight.grad.abs().sum() > 0 and expert.fc2.weight.grad.abs().sum() > 0


def test_hard_and_constant_build_no_router_network_or_task_tokens():
    for router in ("hard", "constant"):
        connector = small(router=router)
        assert n_params(connector) == n_params(connector.experts)
        assert not hasattr(connector, "task_tokens")
    assert not hasattr(small(router_input="token"), "task_tokens")


# ------------------------------------------------------------------------------------ parameter counts

def full_size(**kw) -> Connector:
    with torch.device("meta"):
        return Connector(ConnectorConfig(**kw))


def test_main_configuration_parameter_counts():
    """Spec section 2: the full-size main connector (built on meta, no memory)."""
    connector = full_size()
    assert n_params(connector.experts) == 199_270_400
    assert n_params(connector.router) == 507_781_125
    assert n_params(connector.task_tokens) == 28_160
    assert n_params(connector) == 199_270_400 + 507_781_125 + 28_160
    assert all(p.shape == (1, 1, 5632) for p in connector.task_tokens.values())
    assert connector.router.fc1.weight.shape == (45056, 11264)


def test_connector_baseline_parameter_counts():
    assert n_params(full_size(connector="linear")) == 5632 * 4096 + 4096
    assert n_params(full_size(connector="mlp")) == 5632 * 4096 + 4096 + 4096 * 4096 + 4096
    # pooling keeps 1408-wide tokens; the task token is tied to that width
    pooled = full_size(resampler="avgpool")
    assert n_params(pooled.task_tokens) == 5 * 1408
    assert pooled.router.fc1.weight.shape == (4 * 2816, 2816)
    # the router's hidden width is a config value
    assert full_size(router_hidden=64).router.fc1.weight.shape == (64, 11264)


def test_full_size_forward_shapes_on_meta():
    embeds, w = full_size()(torch.empty(2, 256, 1408, device="meta"), "vqa")
    assert embeds.shape == (2, 64, 4096) and w.shape == (2, 64, 5)


# --------------------------------------------------------------------------------------------- errors

def test_clear_errors():
    connector = small()
    with pytest.raises(ValueError, match="unknown image task 'qa'"):
        connector(features(), "qa")
    with pytest.raises(ValueError, match="unknown image task 'vqa_rad'"):
        connector(features(), "vqa_rad")
    with pytest.raises(ValueError, match=r"features have shape \[2, 256, 7\]"):
        connector(torch.randn(2, 256, 7), "vqa")
    with pytest.raises(ValueError, match="experts must be 5"):
        ConnectorConfig(router="hard", experts=3)
    for method in ("avgpool", "maxpool"):
        with pytest.raises(ValueError, match="rate=2"):
            ConnectorConfig(resampler=method, rate=2)
    with pytest.raises(ValueError, match="ConnectorConfig.router='dense'"):
        ConnectorConfig(router="dense")
    with pytest.raises(ValueError, match="top_k=6"):
        ConnectorConfig(router="sparse", top_k=6)
    with pytest.raises(ValueError, match="rate=3"):
        small(rate=3)(features(), "vqa")
    assert set(CONNECTORS) == {"linear", "mlp", "moe"}


def test_bf16_connector_with_fp32_features():
    """A bf16 connector (e.g. loaded for inference) takes ln_vision's float32 output."""
    connector = small().to(torch.bfloat16)
    embeds, w = connector(features(), "cls")
    assert embeds.dtype == torch.bfloat16 and w.dtype == torch.float32
    assert torch.allclose(w.sum(-1), torch.ones(2, 64), atol=1e-6)
    embeds.float().sum().backward()
    assert connector.task_tokens["cls"].grad.dtype == torch.bfloat16
