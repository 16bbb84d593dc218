"""Convert the official EVA ViT-G checkpoint once: eva_vit_g.pth -> eva_vit_g.safetensors.

    python -m workshop.convert eva_vit_g.pth eva_vit_g.safetensors

Keeps the tensors vision.EVAViT uses under their official names (block 39, which the official model
never builds, is dropped), so the book loads them without unpickling anything.
"""
import sys
from typing import Optional

import torch
from safetensors.torch import save

from lib.files import atomic, read_torch
from vision import EVAConfig, EVAViT


def convert(src: str, dst: str, config: Optional[EVAConfig] = None) -> list[str]:
    """Write the tensors of `src` (official .pth) that EVAViT(config) uses to `dst` (.safetensors).

    Returns (and prints) the keys it dropped: block 39, and anything else the model has no slot for.
    Shapes are checked when the file is loaded, so a checkpoint with another position grid converts.
    """
    state = read_torch(src, "checkpoint (EVA ViT-G .pth)")  # a .pth is a pickle: never unpickle code
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict):
        raise ValueError(f"{src}: expected a state dict, found {type(state).__name__}")
    with torch.device("meta"):
        wanted = set(EVAViT(config or EVAConfig()).state_dict())
    kept = {k: v.contiguous() for k, v in state.items() if k in wanted and torch.is_tensor(v)}
    dropped = [k for k in state if k not in kept]
    missing = sorted(wanted - set(kept))
    if missing:
        raise ValueError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with atomic(dst) as f:
        f.write(save(kept, metadata={"format": "pt"}))
    print(f"wrote {len(kept)} tensors to {dst}; dropped {len(dropped)}: {', '.join(dropped) or '-'}")
    return dropped


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m workshop.convert eva_vit_g.pth eva_vit_g.safetensors")
    try:
        convert(sys.argv[1], sys.argv[2])
    except (ValueError, OSError) as e:  # the file at fault is named in e
        sys.exit(f"workshop.convert: {e}")
