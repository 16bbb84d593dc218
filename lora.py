"""LoRA and LoRA-MoE adapters for the frozen LLaMA (paper Section 3.3; Appendix A.2, Eq. 15).

Uni-Med fine-tunes the LLM with plain LoRA (Hu et al., 2021) on every linear layer of LLaMA-2 but
lm_head, rank 8, alpha 16, dropout 0.05, exactly as peft does it (the official code uses peft):

    h = W0 x + (alpha / r) B A dropout(x)          W0 frozen; A [r, in] kaiming-uniform, B [out, r] zero

B starts at zero, so a fresh adapter leaves the model unchanged.

LoRA-MoE, the baseline of Table 2(e), gives each layer N LoRA experts mixed per token by a sparse
top-k router (N=5, r=4, alpha=8, top-2 in the paper):

    h = W0 x + (alpha / r) sum_k R(x)_k B_k A_k x                      (Eq. 15)

The N experts are stored stacked: lora_A = Linear(in, N r) holds A_1..A_N one above the other and
lora_B = Linear(N r, out) holds [B_1 ... B_N] side by side, so that
sum_k R_k B_k A_k x = lora_B(R-weighted lora_A(x)): two matmuls for all experts, and plain LoRA is
simply N = 1 without a router.

Dtype: LoRA weights are created with the dtype and device of the layer they wrap. (UniMed then keeps
every trainable weight, LoRA included, in float32 and runs the maths under bf16 autocast, since a
bf16 weight cannot hold updates as small as lr 1e-6.)
"""
import math

import torch
from torch import nn

from cmoe import top_k_softmax

# Every linear layer of a LLaMA block (peft's 'all' in the official config; lm_head is not wrapped).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: LoRA (experts=1) or LoRA-MoE (experts>1)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 experts: int = 1, top_k: int = 2):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1 or experts < 1:
            raise ValueError(f"LoRALinear: r={r} and experts={experts} must both be >= 1")
        if experts > 1 and not 1 <= top_k <= experts:
            raise ValueError(f"LoRALinear: top_k={top_k} must be in 1..experts={experts}")
        self.base = base.requires_grad_(False)
        self.r, self.experts, self.top_k = r, experts, top_k
        self.scaling = alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, experts * r, bias=False, **like)  # [N r, in]
        self.lora_B = nn.Linear(experts * r, base.out_features, bias=False, **like)  # [out, N r]
        # LoRA-MoE router R: the paper gives no detail, so this is our choice: one bias-free Linear
        # scoring the N experts from the layer's input, top-k kept (the sparse router, Eq. 13).
        self.router = nn.Linear(base.in_features, experts, bias=False, **like) if experts > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.router is None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft and loralib
        else:
            # The paper says Gaussian for LoRA-MoE; std 1/r as peft's "gaussian" init.
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        nn.init.zeros_(self.lora_B.weight)  # a fresh adapter changes nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.lora_A(self.dropout(x))  # [..., N r]
        if self.router is not None:  # Eq. 15: weight expert k's rank-r slice by R(x)_k
            weights = top_k_softmax(self.router(x).float(), self.top_k).to(h.dtype)  # [..., N]
            h = (h.unflatten(-1, (self.experts, self.r)) * weights[..., None]).flatten(-2)
        return y + self.lora_B(h) * self.scaling  # same order of operations as peft

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, experts={self.experts}"


def apply_lora(model: nn.Module, targets=TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               experts: int = 1, top_k: int = 2) -> list[str]:
    """Freeze all of `model`, then wrap every nn.Linear whose attribute name is in `targets` in a
    LoRALinear (whose adapter is trainable). Returns the qualified names of the wrapped layers."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"apply_lora: {type(model).__name__} already has LoRA layers")
    model.requires_grad_(False)
    wrapped = []
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout, experts, top_k))
                wrapped.append(f"{prefix}.{name}" if prefix else name)
    if not wrapped:
        raise ValueError(f"apply_lora: no nn.Linear named one of {tuple(targets)} in {type(model).__name__}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
