"""Connector-MoE: the bridge from the frozen vision encoder to the LLM (Uni-Med's contribution).

One connector shared by all tasks suffers a "tug of war": the tasks' gradients pull its weights in
different directions. Uni-Med replaces it by a mixture of projection experts, mixed per visual
token by a router that also sees a learnable token of the batch's task (paper Section 3.2, Appendix A):

    features   [B, 256, 1408]   EVA ViT-G/14 patch tokens after ln_vision, CLS dropped
    resampler  [B, 64, 5632]    Eq. 7: each run of 4 consecutive tokens concatenated
    router     [B, 64, 5]       Eq. 8 / 14: weights over N experts from [task token, token]
    experts    [B, 64, 4096]    Eq. 9: weighted sum of N two-layer MLPs -> LLM input embeddings

Every ablation of the paper is a switch of `ConnectorConfig`: the resampler (projection, 2x2 average
or max pooling, none), the connector (one linear layer, one MLP, or the mixture), the router type
(constant Eq. 11, hard Eq. 12, sparse Eq. 13, soft Eq. 14) and what the router sees (the token, the
task token, or both). Where the official code (MSIIP/Uni-Med) and the paper disagree, a comment at
the spot says which one we follow (spec section 10).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# The image tasks in the official order: the hard router sends task i to expert i. Text-only QA has
# no image, so it never reaches the connector and has no task token.
IMAGE_TASKS = ("vqa", "refer", "identify", "caption", "cls")

RESAMPLERS = ("projection", "avgpool", "maxpool", "none")
CONNECTORS = ("linear", "mlp", "moe")
ROUTERS = ("constant", "hard", "sparse", "soft")
ROUTER_INPUTS = ("token", "task", "token_task")


@dataclass
class ConnectorConfig:
    """Defaults are the main Uni-Med model: projection a=4, five experts, soft router on [task, token]."""
    vit_width: int = 1408
    llm_width: int = 4096
    resampler: str = "projection"  # one of RESAMPLERS
    rate: int = 4  # tokens merged into one: projection concatenates `rate`; pooling needs 4; none ignores it
    connector: str = "moe"  # one of CONNECTORS; the fields below only matter for "moe"
    experts: int = 5  # N
    router: str = "soft"  # one of ROUTERS
    router_input: str = "token_task"  # one of ROUTER_INPUTS
    top_k: int = 2  # K of the sparse router
    router_hidden: Optional[int] = None  # None: the official 4 x router input width

    def __post_init__(self):
        for field, allowed in (("resampler", RESAMPLERS), ("connector", CONNECTORS),
                               ("router", ROUTERS), ("router_input", ROUTER_INPUTS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"ConnectorConfig.{field}={getattr(self, field)!r}: "
                                 f"expected one of {allowed}")
        if self.rate < 1:
            raise ValueError(f"ConnectorConfig.rate={self.rate}: must be >= 1")
        if self.resampler in ("avgpool", "maxpool") and self.rate != 4:
            raise ValueError(f"ConnectorConfig.rate={self.rate}: resampler {self.resampler!r} is a 2x2 "
                             f"window, which merges exactly 4 tokens; set rate=4")
        if self.connector != "moe":
            return
        if self.experts < 1:
            raise ValueError(f"ConnectorConfig.experts={self.experts}: must be >= 1")
        if self.router == "hard" and self.experts != len(IMAGE_TASKS):
            raise ValueError(f"ConnectorConfig.experts={self.experts}: the hard router gives each of the "
                             f"{len(IMAGE_TASKS)} image tasks {IMAGE_TASKS} its own expert, so experts "
                             f"must be {len(IMAGE_TASKS)}")
        if self.router == "sparse" and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"ConnectorConfig.top_k={self.top_k}: must be in 1..experts={self.experts}")

    @property
    def token_width(self) -> int:
        """Width of a visual token after the resampler: 1408 x a for projection, 1408 otherwise."""
        return self.vit_width * self.rate if self.resampler == "projection" else self.vit_width

    @property
    def task_token_width(self) -> int:
        # The official code fixes it in the config (task_token_c = 5632), which only fits projection
        # a=4; we tie it to the token width so every resampler works (spec section 10).
        return self.token_width

    @property
    def uses_router_network(self) -> bool:
        return self.connector == "moe" and self.router in ("sparse", "soft")

    @property
    def uses_task_tokens(self) -> bool:
        return self.uses_router_network and self.router_input != "token"

    @property
    def router_width(self) -> int:
        """Width of the router's input: the token, the task token, or both side by side."""
        return {"token": self.token_width, "task": self.task_token_width,
                "token_task": self.token_width + self.task_token_width}[self.router_input]

    @property
    def router_hidden_width(self) -> int:
        # The paper calls the router "lightweight"; the official one is 4x wide (507.8M parameters
        # for token_task). The default keeps the official width since it produced the numbers.
        return self.router_hidden or 4 * self.router_width


# -------------------------------------------------------------------------------------------------
# Resampler (Eq. 7): fewer, wider visual tokens

def resample(features: torch.Tensor, method: str, rate: int) -> torch.Tensor:
    """Eq. 7: f_ag = resampler(V_en(I), a).  [B, 256, W] -> [B, 64, 4W] (projection a=4) or [B, 64, W].

    projection: a reshape, so output token j is input tokens a*j .. a*j+a-1 side by side: with a=4,
    four neighbours along a row of the 16x16 grid, not a 2x2 window (as the official code does).
    avgpool / maxpool: a 2x2 window with stride 2 on the 16x16 grid.  none: the tokens unchanged.
    """
    B, N, W = features.shape
    if method == "none":
        return features
    if method == "projection":
        if N % rate:
            raise ValueError(f"resample: {N} visual tokens (features {list(features.shape)}) do not "
                             f"split into runs of rate={rate}")
        return features.reshape(B, N // rate, rate * W)  # [B, 64, 5632]
    side = math.isqrt(N)
    if side * side != N or side % 2:
        raise ValueError(f"resample: {method} needs an even square grid of tokens, got {N} "
                         f"(features {list(features.shape)})")
    grid = features.transpose(1, 2).reshape(B, W, side, side)  # [B, 1408, 16, 16], raster order
    pool = F.avg_pool2d if method == "avgpool" else F.max_pool2d
    return pool(grid, kernel_size=2, stride=2).flatten(2).transpose(1, 2)  # [B, 64, 1408]


def token_of_patch(method: str, rate: int, patches: int) -> torch.Tensor:
    """The resampled token each ViT patch goes into, [patches] (raster order): `resample`'s grouping
    turned around, to lay a per-token quantity (a routing weight) back onto the image's patches."""
    patch = torch.arange(patches)
    if method == "none":
        return patch
    if method == "projection":
        return patch // rate  # a run of `rate` consecutive patches along a row
    side = math.isqrt(patches)  # pooling: the 2x2 window holding the patch
    return (patch // side // 2) * (side // 2) + patch % side // 2


# -------------------------------------------------------------------------------------------------
# Experts and router

class Expert(nn.Module):
    """One projection expert E_k: Linear -> GELU -> Linear. The "mlp" connector is a single expert."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_width, out_width)
        self.fc2 = nn.Linear(out_width, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def top_k_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 13: softmax over the k largest logits of each row; every other weight is exactly zero.

    The paper sets the dropped logits to "0", but exp(0) > 0 would still give every expert a weight,
    so the router would not be sparse. The official code sets them to -inf, and so do we.
    """
    top, index = logits.topk(k, dim=-1)
    return logits.new_full(logits.shape, float("-inf")).scatter(-1, index, top).softmax(dim=-1)


class Router(nn.Module):
    """Per-token weights over the N experts: [B, T, router_width] -> [B, T, N], each row summing to 1.

    The learned routers (sparse, soft) score the experts with a small network g = fc1 -> GELU -> fc2.
    Constant and hard routers have no parameters: they only read the batch size, token count and task.
    """

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.type, self.experts, self.top_k = config.router, config.experts, config.top_k
        if config.uses_router_network:
            # The official code builds g for every router type (its test `router_type == 'soft' or
            # 'sparse'` is always true); constant and hard never call it, so we build it only here.
            self.fc1 = nn.Linear(config.router_width, config.router_hidden_width)
            self.fc2 = nn.Linear(config.router_hidden_width, config.experts)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        B, T, _ = x.shape
        # Weights are float32 whatever the model dtype, so they sum to 1 to float precision in bf16.
        if self.type == "constant":  # Eq. 11: every expert 1/N, a plain average
            return torch.full((B, T, self.experts), 1.0 / self.experts, device=x.device)
        if self.type == "hard":  # Eq. 12: task i of IMAGE_TASKS owns expert i, no learning
            weights = torch.zeros(B, T, self.experts, device=x.device)
            weights[..., IMAGE_TASKS.index(task)] = 1.0
            return weights
        logits = self.fc2(F.gelu(self.fc1(x))).float()  # g(x): [B, T, N]
        if self.type == "sparse":
            return top_k_softmax(logits, self.top_k)  # Eq. 13
        # Eq. 14: sigmoid, then normalised to sum 1. (Eq. 8 in the main text names this sigma
        # "SoftMax"; Eq. 14 and the official code use sigmoid / sum, which we follow.)
        gates = logits.sigmoid()
        return gates / gates.sum(dim=-1, keepdim=True)


# -------------------------------------------------------------------------------------------------
# The connector

class Connector(nn.Module):
    """Resampler + connector: ViT features of one task's batch -> LLM input embeddings.

    connector "linear": one Linear; "mlp": one Expert; "moe": N experts mixed by a router (Eq. 9),
    which for the sparse and soft routers may also see a learnable token of the task (Eq. 8).
    """

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.config = config
        width = config.token_width
        if config.connector == "linear":
            self.proj = nn.Linear(width, config.llm_width)
        elif config.connector == "mlp":
            self.proj = Expert(width, config.llm_width)
        else:
            self.experts = nn.ModuleList(Expert(width, config.llm_width) for _ in range(config.experts))
            self.router = Router(config)
        if config.uses_task_tokens:
            # One [1, 1, D] vector per image task, as in the official code. Separate parameters
            # matter: a task absent from the batch then has no gradient at all and AdamW leaves its
            # token alone, whereas rows of one [5, D] tensor would all move with momentum and decay.
            self.task_tokens = nn.ParameterDict({
                task: nn.Parameter(nn.init.normal_(torch.empty(1, 1, config.task_token_width), std=0.02))
                for task in IMAGE_TASKS})

    def forward(self, features: torch.Tensor, task: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """features [B, 256, vit_width] (ln_vision output, CLS dropped) of a batch of one `task`
        -> (embeds [B, T, llm_width], routing weights [B, T, N] in float32, or None without experts)."""
        cfg = self.config
        if task not in IMAGE_TASKS:
            raise ValueError(f"Connector: unknown image task {task!r}; expected one of {IMAGE_TASKS} "
                             f"(text-only QA has no image and must not reach the connector)")
        if features.dim() != 3 or features.shape[-1] != cfg.vit_width:
            raise ValueError(f"Connector: features have shape {list(features.shape)}, expected "
                             f"[B, tokens, vit_width={cfg.vit_width}]")
        x = resample(features.to(self.dtype), cfg.resampler, cfg.rate)  # Eq. 7: [B, 64, 5632]
        if cfg.connector != "moe":
            return self.proj(x), None  # [B, 64, 4096]
        weights = self.router(self.router_input(x, task), task)  # [B, 64, N]
        # Eq. 9 (Eq. 6 for each token): f_align = sum_k w_k E_k(f_ag). Every expert runs on every
        # token, as in the official code; there is no load-balancing or auxiliary loss.
        embeds = sum(weights[..., k, None].to(x.dtype) * expert(x) for k, expert in enumerate(self.experts))
        return embeds, weights  # [B, 64, 4096], [B, 64, N]

    def router_input(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """What the router g sees (Eq. 8): the token, the task's token, or both. [B, T, router_width]"""
        if not self.config.uses_task_tokens:
            return x  # router_input "token", or a constant / hard router that only reads the shape
        task_token = self.task_tokens[task].expand(x.shape[0], x.shape[1], -1)  # [B, 64, 5632]
        if self.config.router_input == "task":
            return task_token
        # The paper writes [f_ag, task token]; the official code concatenates [task token, f_ag].
        # The order only permutes fc1's input columns, but we keep the code's so its weights load.
        return torch.cat([task_token, x], dim=-1)  # [B, 64, 11264]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
