"""AdamW that steps each weight inside the backward, with bf16 moments: train.py --low-memory.

torch.optim.AdamW steps after the backward, so every gradient exists at once beside the two fp32
moments (for Uni-Med's 727M trainable weights: 2.7 + 5.4 GiB). Here a weight takes its AdamW step
as soon as its gradient is whole (a post-accumulate-grad hook, as torchtune's optimizer_in_bwd) and
the gradient is freed at once. The update runs in fp32, `chunk` elements at a time, so it makes no
weight-sized temporary; the moments are stored in bf16. A Linear layer larger than one chunk (the
router's first layer, 508M weights) never has a whole gradient, nor a whole bf16 copy of its
weight: its forward and backward go a block of rows at a time, and each block of its gradient is
stepped as soon as it is made (`LinearStepInBackward`).

What it computes differently from torch.optim.AdamW (docs/memory-and-speed.md has the numbers):
  - the moments are rounded to bf16 after each step, stochastically (up with the probability of the
    remainder, from noise seeded by the weight's index and step, so a resumed run is bit-exact). Round
    to nearest would freeze a second moment with beta2 0.999: its change per step, 0.1% of it, is
    under half a bf16 step (0.2%);
  - a split Linear's products run a block at a time: the same sums, in another order of rounding;
  - the gradient norm is summed from each chunk's squares as the backward goes; there is no whole
    gradient to clip, to accumulate over micro-batches or to all-reduce (DDP): those are refused.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


class AdamWInBackward(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) stepping each weight in the backward.

    `groups` as torch.optim.AdamW takes them. `model` holds the weights: its Linear layers with more
    than `chunk` weights are split. `state_dtype` float32 gives torch.optim.AdamW's numbers exactly
    (tests/test_optim.py); chunk=None (whole tensors) and split=False measure the levers one by one
    (bench/memory_levers.py)."""

    def __init__(self, model: nn.Module, groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 state_dtype=torch.bfloat16, chunk=2**22, split=True):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.state_dtype, self.chunk = state_dtype, chunk
        self.squares = None  # this step's sum of squared gradient elements, on the device
        self.generators = {}  # device -> the generator of the rounding noise
        self.where = {}  # id(weight) -> (its group's index, its index among all the optimizer's weights)
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.where[id(p)] = (g, len(self.where))
        large = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in self.where
                 and split and chunk is not None and m.weight.numel() > chunk]
        for m in large:  # a forward of the layer's own (its weights keep their names), stepped in its backward
            m.forward = functools.partial(LinearStepInBackward.apply_to, m, self)
        for group in self.param_groups:
            for p in group["params"]:
                if not any(p is m.weight for m in large):
                    p.register_post_accumulate_grad_hook(self.step_weight)

    @torch.no_grad()
    def step_weight(self, p: torch.Tensor) -> None:
        """The hook: p's gradient is whole; step p and free the gradient (none came: no step)."""
        grad, p.grad = p.grad, None
        if grad is not None:
            self.update(p, grad, 0)

    @torch.no_grad()
    def update(self, p: torch.Tensor, grad: torch.Tensor, offset: int) -> None:
        """AdamW on the elements offset .. offset + grad.numel() of p (flattened), `grad` their
        gradient in any float dtype. A step's first call has offset 0."""
        group_index, index = self.where[id(p)]
        group, state = self.param_groups[group_index], self.state[p]  # (load_state_dict makes new groups)
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p, dtype=self.state_dtype),
                         exp_avg_sq=torch.zeros_like(p, dtype=self.state_dtype))
        if offset == 0:
            state["step"] += 1
            self.generator(p.device).manual_seed(index << 32 | state["step"])
        lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
        step_size, bias2_sqrt = lr / (1 - beta1 ** state["step"]), (1 - beta2 ** state["step"]) ** 0.5
        grad = grad.reshape(-1)
        chunk = self.chunk or grad.numel()
        for start in range(0, grad.numel(), chunk):
            at = slice(offset + start, offset + min(start + chunk, grad.numel()))
            g = grad[at.start - offset:at.stop - offset].float()  # [chunk]
            w, m, v = (t.view(-1)[at] for t in (p, state["exp_avg"], state["exp_avg_sq"]))
            m32, v32 = m.float(), v.float()  # the moments themselves when they are fp32
            self.squares = torch.dot(g, g) if self.squares is None else self.squares + torch.dot(g, g)
            # torch.optim.AdamW's single-tensor step, op for op
            w.mul_(1 - lr * wd)
            m32.lerp_(g, 1 - beta1)
            v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.addcdiv_(m32, (v32.sqrt() / bias2_sqrt).add_(eps), value=-step_size)
            if m32 is not m:
                m.copy_(self.round(m32))
                v.copy_(self.round(v32))

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 -> bf16 stochastically: add 16 random low bits, cut them. x [n] fp32 -> [n] fp32
        whose values are bf16 (so the copy into a bf16 moment is exact)."""
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                              generator=self.generator(x.device))
        return noise.add_(x.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)

    def generator(self, device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device)
        return self.generators[device]

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of this step's gradients (as clip_grad_norm_ measures it), from the squares."""
        return torch.zeros(()) if self.squares is None else self.squares.sqrt()

    def step(self, closure=None) -> None:
        """The weights took their steps in the backward; this ends the step (the norm starts again)."""
        self.squares = None

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer's, but each moment goes to the device in its own dtype, one at a time
        (Optimizer's makes every moment fp32 on the device: twice this state, at once)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for group in self.param_groups for p in group["params"]]
        for i, state in saved.items():
            p = params[i]
            self.state[p] = {k: int(v) if k == "step" else v.to(p.device, self.state_dtype)
                             for k, v in state.items()}  # (torch.optim.AdamW's step is a tensor)


class LinearStepInBackward(torch.autograd.Function):
    """y = x W^T + b for a Linear whose weight is stepped by `optimizer` in this backward, in blocks
    of rows, so that neither its whole gradient nor a whole copy in the compute dtype exists. It
    computes as autocast's Linear does: in the autocast dtype (bf16), or in W's dtype without autocast."""

    @staticmethod
    def apply_to(module: nn.Linear, optimizer: AdamWInBackward, x: torch.Tensor) -> torch.Tensor:
        return LinearStepInBackward.apply(x, module.weight, module.bias, optimizer)

    @staticmethod
    def forward(ctx, x, weight, bias, optimizer):
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        rows = blocks(weight.shape[0], optimizer.chunk // weight.shape[1])
        x_c = x.to(dtype)
        y = torch.cat([F.linear(x_c, weight[r].to(dtype), None if bias is None else bias[r].to(dtype))
                       for r in rows], dim=-1)  # [..., out]
        ctx.save_for_backward(x_c)
        ctx.weight, ctx.bias, ctx.optimizer, ctx.x_dtype = weight, bias, optimizer, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x,), weight, optimizer = ctx.saved_tensors, ctx.weight, ctx.optimizer
        out_width, in_width = weight.shape
        grad_y, x2 = grad_y.to(x.dtype).reshape(-1, out_width), x.reshape(-1, in_width)  # [n, out], [n, in]
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:  # with the weights of the forward, before they step: blocks of columns
            grad_x = torch.cat([grad_y @ weight[:, c].to(x.dtype)
                                for c in blocks(in_width, optimizer.chunk // out_width)], dim=-1)
            grad_x = grad_x.reshape(x.shape).to(ctx.x_dtype)
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0).to(ctx.bias.dtype)
        for r in blocks(out_width, optimizer.chunk // in_width):  # W's gradient, rows r: [rows, in]
            optimizer.update(weight, grad_y[:, r].T @ x2, r.start * in_width)
        return grad_x, None, grad_b, None


def blocks(n: int, size: int) -> list[slice]:
    """0 .. n in slices of `size` (at least 1)."""
    size = max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
