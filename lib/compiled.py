"""torch.compile for training (train.py --compile): the LLaMA block by block, the connector, the ViT.

At batch 4 x ~192 tokens every matrix product is small, and an eager step is thousands of kernels
the host dispatches one at a time (a LLaMA block with its seven LoRA layers: ~290 kernels a step):
the host, not the GPU, sets the pace. Compiled, each block is one graph in which inductor fuses the
norms, rotary embeddings, SwiGLU, dropout, LoRA's scaling, the residual adds and autocast's casts
into a few kernels around the matrix products. Regional compilation: the 32 blocks share one graph
(their weights are its inputs), so compiling costs one block per sequence length, and UniMed pads
training rows to a multiple of PAD_TO so that few lengths occur. Gradient checkpointing wraps the
compiled block as it wraps the eager one: the backward runs the compiled forward again.

The ViT runs under no_grad at one shape: compiled whole, as one CUDA graph on a GPU (a replay instead
of ~600 launches). The LLaMA blocks get no CUDA graphs: checkpointing re-runs their forward inside
the backward, and each block would record its own graph. The trainable connector is compiled too (its
router and five experts, ~100 kernels a step eager). Left eager: UniMed.forward (it tokenises), the
loss (few ops), and the optimizer (AdamW is fused: one kernel).
"""
import torch

PAD_TO = 64


def compile_for_training(model) -> None:
    """Compile `model` (a UniMed) in place for training."""
    cuda = model.llama.embed.weight.device.type == "cuda"
    torch._dynamo.config.recompile_limit = 64  # a graph per padded length: 64 x 64 = 4096 tokens
    for block in model.llama.layers:
        block.compile(dynamic=False)
    model.connector.compile(dynamic=False)  # a graph per task (its task token)
    vit = torch.compile(model.vit.forward, dynamic=False, options={"triton.cudagraphs": cuda})

    def vit_forward(images):
        if cuda:  # the last replay's output is consumed: this one may overwrite it
            torch.compiler.cudagraph_mark_step_begin()
        return vit(images)
    model.vit.forward = vit_forward
    model.pad_to = PAD_TO
