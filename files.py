"""Reading and writing files: every read names the file when it fails, every write is atomic.

Every other file of the project reads weights, checkpoints and results through the functions here,
so that a truncated download or a foreign file stops the run with one line naming the path and
what is wrong with it, never a library's traceback that names no file. It comes first in the
reading order because vision.py, model.py, data.py, train.py and evaluate.py all use it.

  load_safetensors   materialise a module built on the meta device from safetensors files
  open_safetensors   one safetensors file, its header checked
  read_torch         a torch checkpoint, without unpickling code (weights_only=True)
  save_torch         torch.save, atomically
  write_json         json.dump, atomically, NaN and inf written as null
"""
import contextlib
import json
import math
import os
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what} file")


# -------------------------------------------------------------------------------------------------
# Safetensors (the LLaMA shards, EVA ViT-G, the demo weights)

@contextlib.contextmanager
def open_safetensors(path: str):
    """safe_open with an error that names the file: a truncated copy fails on its header here."""
    require_file(path, "safetensors")
    try:
        f = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    with f:
        yield f


def load_safetensors(module: nn.Module, files: list[str], rename: Callable[[str], Optional[str]],
                     dtype: torch.dtype, device="cpu") -> None:
    """Materialise `module` (built on the meta device) from safetensors `files`, tensor by tensor.

    `rename` maps an official key to our parameter name, or to None for a tensor we deliberately
    drop. Peak host memory stays near the size of the weights: each tensor is read, cast and moved
    once, and nothing else is ever allocated for it. Every tensor of the module must be found
    exactly once with the right shape; anything else is an error naming the tensor and the file.
    """
    expected = dict(module.state_dict(keep_vars=True))  # our name -> meta tensor
    origin = {}  # our name -> (file, official key), to report duplicates
    for path in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        with open_safetensors(path) as f:
            for key in f.keys():
                name = rename(key)
                if name is None:
                    continue
                if name not in expected:
                    raise ValueError(f"{path}: unexpected tensor '{key}' (mapped to '{name}', "
                                     f"which {type(module).__name__} does not have)")
                if name in origin:
                    raise ValueError(f"{path}: tensor '{key}' duplicates '{origin[name][1]}' "
                                     f"from {origin[name][0]} (both map to '{name}')")
                shape, want = tuple(f.get_slice(key).get_shape()), tuple(expected[name].shape)
                if shape != want:
                    raise ValueError(f"{path}: tensor '{key}' has shape {list(shape)}, but "
                                     f"'{name}' needs {list(want)}")
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{path}: tensor '{key}' cannot be read (truncated file?): {e}") from None
                tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                assign(module, name, tensor)
                origin[name] = (path, key)
    missing = [name for name in expected if name not in origin]
    if missing:
        shown = ", ".join(f"'{m}' {list(expected[m].shape)}" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"missing tensors in {', '.join(files)}: {shown}{more}")


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter or buffer `name` of `module` by a real tensor."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = tensor


# -------------------------------------------------------------------------------------------------
# Torch checkpoints (ours, the official runner's checkpoint_N.pth, eva_vit_g.pth)

def read_torch(path: str, what: str = "checkpoint"):
    """torch.load without unpickling code: a pickle that names any class or function is refused."""
    require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of arbitrary objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read as a {what} with torch.load(weights_only=True) "
                         f"(truncated, corrupted or not a {what}?): {first}") from None


def save_torch(path: str, obj) -> None:
    """Atomic: write path.tmp, then rename over path. A crash mid-write leaves the old file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# -------------------------------------------------------------------------------------------------
# JSON results

def write_json(path: str, obj, indent: int = 2) -> None:
    """Atomically (path.tmp, then renamed over path); JSON has no NaN or inf, so they become null."""
    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    with open(path + ".tmp", "w") as f:
        json.dump(clean(obj), f, indent=indent)
    os.replace(path + ".tmp", path)
