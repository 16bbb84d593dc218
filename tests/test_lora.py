"""LoRA against peft on a tiny transformers LLaMA; merging; freezing; LoRA-MoE (Eq. 15)."""
import copy

import pytest
import torch
from torch import nn

from lora import TARGETS, LoRALinear, apply_lora, lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).float()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_same_outputs_and_gradients_as_peft(dropout):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(TARGETS)))
    ours = tiny_llama()
    names = apply_lora(ours, r=8, alpha=16, dropout=dropout)
    assert len(names) == 2 * 7
    base = theirs.base_model.model
    # the same non-trivial adapter in both (B non-zero, otherwise the update would be zero)
    g = torch.Generator().manual_seed(1)
    for name in names:
        mine, peft_layer = ours.get_submodule(name), base.get_submodule(name)
        for ours_w, theirs_w in ((mine.lora_A.weight, peft_layer.lora_A["default"].weight),
                                 (mine.lora_B.weight, peft_layer.lora_B["default"].weight)):
            assert ours_w.shape == theirs_w.shape
            value = torch.randn(ours_w.shape, generator=g) * 0.1
            with torch.no_grad():
                ours_w.copy_(value)
                theirs_w.copy_(value)
    tokens = torch.randint(0, 64, (2, 10), generator=g)
    ours.train(), theirs.train()
    torch.manual_seed(2)  # dropout masks are drawn in the same order by both
    out_ours = ours(tokens, labels=tokens)
    torch.manual_seed(2)
    out_theirs = theirs(input_ids=tokens, labels=tokens)
    assert torch.allclose(out_ours.logits, out_theirs.logits, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name in names:
        mine, peft_layer = ours.get_submodule(name), base.get_submodule(name)
        assert mine.lora_A.weight.grad.abs().sum() > 0
        assert torch.allclose(mine.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-6)
        assert torch.allclose(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-6)
    # the same parameters train: the LoRA matrices of the same layers, nothing else
    assert {n.replace(".default", "").removeprefix("base_model.model.") for n in trainable(theirs)} \
        == {n.replace(".base_layer", "") for n in trainable(ours)}


def test_fresh_lora_changes_nothing_and_is_initialised_like_peft():
    ref = tiny_llama()
    ours = copy.deepcopy(ref)
    apply_lora(ours)
    tokens = torch.randint(0, 64, (2, 9))
    ours.eval(), ref.eval()
    assert torch.equal(ours(tokens).logits, ref(tokens).logits)
    layer = ours.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32, as nn.Linear and peft
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert layer.scaling == 2.0


# ----------------------------------------------------------------------------------------- freezing

def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights alone (lora_A, lora_B, a LoRA-MoE router), keyed as in model.state_dict()."""
    return {f"{name}.{key}": tensor for name, layer in lora_layers(model).items()
            for key, tensor in layer.state_dict().items() if not key.startswith("base.")}


def test_only_lora_parameters_are_trainable():
    model = tiny_llama()
    names = apply_lora(model)
    want = {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert trainable(model) == want
    # lm_head and embeddings stay plain and frozen
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
    assert set(lora_state_dict(model)) == want


def test_lora_state_dict_round_trip():
    model = tiny_llama()
    apply_lora(model)
    for p in lora_state_dict(model).values():
        p.normal_()  # state_dict tensors share storage: make the adapter non-trivial
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    other = tiny_llama()
    apply_lora(other)
    missing, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    tokens = torch.randint(0, 64, (1, 7))
    assert torch.allclose(model.eval()(tokens).logits, other.eval()(tokens).logits)


def test_errors():
    model = tiny_llama()
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(tiny_llama(), targets=("query",))
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(2, 2, 1))


def test_bf16_base_layers():
    model = tiny_llama().to(torch.bfloat16)
    apply_lora(model)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    out = model(torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 64, (2, 5)))
    out.loss.backward()
    assert layer.lora_B.weight.grad.dtype == torch.bfloat16 and layer.lora_A.weight.grad.abs().sum() > 0


def test_full_size_lora_parameter_count_on_meta():
    """Spec section 2: LoRA r=8 on q,k,v,o,gate,up,down of LLaMA-2-7B's 32 layers = 19,988,480."""
    def block():
        attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, n, nn.Linear(4096, 4096, bias=False))
        mlp = nn.Module()
        mlp.gate_proj, mlp.up_proj = nn.Linear(4096, 11008, bias=False), nn.Linear(4096, 11008, bias=False)
        mlp.down_proj = nn.Linear(11008, 4096, bias=False)
        return nn.ModuleDict(dict(attn=attn, mlp=mlp))
    with torch.device("meta"):
        model = nn.ModuleDict(dict(layers=nn.ModuleList(block() for _ in range(32)),
                                   lm_head=nn.Linear(4096, 32000, bias=False)))
        assert len(apply_lora(model)) == 32 * 7
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 19_988_480


# ---------------------------------------------------------------------------------------- LoRA-MoE

def moe_layer(seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, experts=5, top_k=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # non-zero, so the experts' updates are visible
    return layer


def test_lora_moe_shapes_and_init():
    layer = LoRALinear(nn.Linear(12, 10), r=4, alpha=8, experts=5)
    assert layer.lora_A.weight.shape == (5 * 4, 12)  # A_1..A_5 stacked
    assert layer.lora_B.weight.shape == (10, 5 * 4)  # [B_1 ... B_5]
    assert layer.router.weight.shape == (5, 12)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 7, 12)
    assert torch.equal(layer(x), layer.base(x))  # a fresh LoRA-MoE changes nothing
    assert layer(x).shape == (3, 7, 10)


def test_lora_moe_is_eq_15_by_hand():
    """h = W0 x + (alpha/r) sum_k R(x)_k B_k A_k x, with R = top-2 softmax of the router logits."""
    layer = moe_layer()
    x = torch.randn(4, 6, 12)
    logits = layer.router(x)
    top, index = logits.topk(2, dim=-1)
    R = torch.zeros_like(logits).scatter(-1, index, top.softmax(-1))  # [4, 6, 5]
    assert ((R > 0).sum(-1) == 2).all()
    A = layer.lora_A.weight.reshape(5, 4, 12)
    B = layer.lora_B.weight.reshape(10, 5, 4).permute(1, 0, 2)  # [5, 10, 4]
    want = layer.base(x) + 2.0 * sum(R[..., k, None] * (x @ A[k].T @ B[k].T) for k in range(5))
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_lora_moe_uses_only_the_top_k_experts():
    layer = moe_layer()
    x = torch.randn(1, 1, 12)
    chosen = layer.router(x).topk(2, dim=-1).indices.flatten().tolist()
    unused = next(k for k in range(5) if k not in chosen)
    before = layer(x)
    with torch.no_grad():
        layer.lora_B.weight[:, 4 * unused:4 * unused + 4].normal_()
    assert torch.allclose(layer(x), before)
    with torch.no_grad():
        layer.lora_B.weight[:, 4 * chosen[0]:4 * chosen[0] + 4].normal_()
    assert not torch.allclose(layer(x), before)


def test_lora_moe_on_a_model_trains_router_and_experts_only():
    model = tiny_llama()
    names = apply_lora(model, r=4, alpha=8, experts=5, top_k=2)
    want = {f"{n}.{p}.weight" for n in names for p in ("lora_A", "lora_B", "router")}
    assert trainable(model) == want == set(lora_state_dict(model))
    for layer in (model.get_submodule(n) for n in names):
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.1)
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, labels=tokens).loss.backward()
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.router.weight.grad.abs().sum() > 0 and layer.lora_A.weight.grad.abs().sum() > 0
