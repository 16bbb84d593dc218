"""train.py --compile (lib/compiled.py): compiled training gives eager's losses and gradients.

A tiny Uni-Med trains a few steps (an image task and text-only QA, fused AdamW) twice from the same
weights, eagerly and compiled, in fp32; with dropout, inductor draws its random numbers as eager
does (fallback_random), so the masks are the same. Compiling takes about a minute on a CPU, so one
case runs by default and the others with UNIMED_SLOW=1.
"""
import pytest
import torch
import torch._inductor.config

from lib.compiled import PAD_TO, compile_for_training
from test_unimed import tiny_unimed, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))

BATCHES = [("vqa", ["[vqa] which side is the lesion", "[vqa] is the heart round"], ["left", "yes"]),
           ("qa", ["[qa] which side is the heart", "[qa] what colour is the liver"], ["left", "dark red"]),
           ("vqa", ["[vqa] what shape", "[vqa] where is the kidney"], ["round", "lower left"])]


def train(model, steps: int = 3) -> list:
    """(loss, gradients) of each step; AdamW moves the weights between steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = []
    for step, (task, instructions, answers) in enumerate(BATCHES[:steps]):
        torch.manual_seed(step)  # the same dropout masks in both runs
        loss, _, _ = model(None if task == "qa" else images, instructions, answers, task)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


CASES = [pytest.param(True, 0.05, id="checkpointed-dropout"),
         pytest.param(False, 0.05, id="dropout", marks=pytest.mark.slow),
         pytest.param(True, 0.0, id="checkpointed", marks=pytest.mark.slow),
         pytest.param(False, 0.0, id="plain", marks=pytest.mark.slow)]


@pytest.mark.parametrize("checkpointing, dropout", CASES)
def test_compiled_training_equals_eager(tokenizer, checkpointing, dropout):
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_unimed(tokenizer, seed=0, lora_dropout=dropout)
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        if compiled:
            compile_for_training(model)
        model.pad_to = PAD_TO  # eager pads as compiled does: the same shapes, the same dropout masks
        with torch._inductor.config.patch(fallback_random=True):
            runs.append(train(model))
    for (eager_loss, eager_grads), (loss, grads) in zip(*runs):
        assert loss == pytest.approx(eager_loss, rel=1e-5, abs=1e-5)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
