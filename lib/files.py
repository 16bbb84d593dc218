"""Reading and writing files: every read names the file when it fails, every write is atomic.

The book reads weights, checkpoints, datasets and results through these functions, so that a
truncated download or a foreign file stops the run with one line naming the path and what is wrong,
never a library's traceback. A missing file is a FileNotFoundError; any other unreadable file is a
ValueError whose message starts with its path. The command lines catch both and exit with that line.
"""
import contextlib
import csv
import io
import json
import math
import os
import pickle
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from sentencepiece import SentencePieceProcessor
from torch import nn
from tqdm import tqdm


def require_file(path: str, what: str) -> None:
    """A missing file is a FileNotFoundError; an empty one (a failed download) is already bad input."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: a directory, where a file ({what}) was expected" if os.path.isdir(path)
                                else f"{path}: no such {what} file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (a failed download or copy?)")


def reason(e: Exception) -> str:
    """A library's error in one line: its first sentence (torch follows it with advice, and puts
    the reason why weights_only refused a pickle after a paragraph about it)."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def unreadable(path: str, what: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable {what} (truncated or corrupted?): {reason(e)}")


# -------------------------------------------------------------------------------------------------
# Safetensors (the LLaMA shards, EVA ViT-G, the demo weights)

@contextlib.contextmanager
def open_safetensors(path: str):
    """safe_open with an error that names the file: a truncated copy fails on its header here."""
    require_file(path, "safetensors")
    try:
        f = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise unreadable(path, "safetensors file", e) from None
    with f:
        yield f


def load_safetensors(module: nn.Module, files: list[str], rename: Callable[[str], Optional[str]],
                     dtype: torch.dtype, device="cpu") -> None:
    """Materialise `module` (built on the meta device) from safetensors `files`, tensor by tensor.

    `rename` maps an official key to our parameter name, or to None for a tensor we deliberately
    drop. Peak host memory stays near the size of the weights: safetensors maps the file, so a tensor
    already in `dtype` on the CPU stays a view of it, read from disk or the page cache when first used
    (the first forward pays those page faults, as with transformers' loader); any other tensor is cast
    or moved once, and nothing else is allocated for it. Every tensor of the module must be found
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
        raise ValueError(f"{path}: cannot be read as a {what} with torch.load(weights_only=True) "
                         f"(truncated, corrupted, or holding objects other than tensors and plain "
                         f"containers?): {reason(e)}") from None


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of an HF model directory: the shards named by the index, or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        table = read_json(index, "safetensors index")
        if not isinstance(table, dict) or not isinstance(table.get("weight_map"), dict):
            raise ValueError(f"{index}: no 'weight_map' (tensor name -> shard file)")
        return [os.path.join(path, shard) for shard in sorted(set(table["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors.index.json nor model.safetensors found")



@contextlib.contextmanager
def atomic(path: str, mode: str = "wb"):
    """Write through path.tmp, renamed over path at the end: a crash mid-write leaves the old file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", mode) as f:
        yield f
    os.replace(path + ".tmp", path)


def save_torch(path: str, obj) -> None:
    with atomic(path) as f:
        torch.save(obj, f)


# -------------------------------------------------------------------------------------------------
# The LLaMA tokenizer

def read_sentencepiece(path: str) -> SentencePieceProcessor:
    require_file(path, "SentencePiece tokenizer.model")
    try:
        return SentencePieceProcessor(model_file=path)
    except Exception as e:
        raise unreadable(path, "SentencePiece model", e) from None


# -------------------------------------------------------------------------------------------------
# Text: the dataset annotations (JSON, JSON lines, CSV, split lists), configs and results

def read_text(path: str, what: str = "text") -> str:
    require_file(path, what)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text at line {line} (corrupted, or not a {what} file?)") from None


def read_json(path: str, what: str = "JSON"):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise unreadable(path, f"{what} file", e) from None


def read_jsonl(path: str, what: str = "JSON-lines") -> list[tuple[int, object]]:
    """(row, value) for each non-blank line, rows counted from 0 as lines of the file."""
    rows, lines = [], read_text(path, what).split("\n")
    for n, line in enumerate(lines):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                if n == len(lines) - 1:  # no line end after it
                    raise ValueError(f"{path}, row {n}: the last line is not JSON and has no line end "
                                     f"(truncated file?): {e}") from None
                raise ValueError(f"{path}, row {n}: malformed row, not JSON ({e})") from None
    return rows


def read_csv(path: str, what: str = "CSV") -> tuple[list, list[dict]]:
    """(column names, rows as dicts). As in csv.DictReader, a short row has None for its missing
    cells and a long one its extra cells under the key None; the caller decides what to keep. A
    short last row with no line end is a file cut short, and an error."""
    text = read_text(path, what)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise unreadable(path, f"{what} file", e) from None
    if rows and None in rows[-1].values() and not text.endswith(("\n", "\r")):
        raise ValueError(f"{path}: not a readable {what} file (truncated?): its last row has "
                         f"{sum(v is not None for v in rows[-1].values())} of {len(reader.fieldnames)} "
                         f"cells and no line end")
    return list(reader.fieldnames or []), rows


def read_log(path: str) -> list:
    """The records of a JSON-lines file appended one line at a time (a training log, a predictions
    file). A last line cut short by a kill is cut off the file, so the next append starts clean; a
    broken line before it is not ours to throw away, and an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    records, good_end = [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        end = good_end + len(line) + 1
        if not line.strip():
            good_end = min(end, len(raw))
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            if end <= len(raw):  # a complete line
                raise ValueError(f"{path}:{lineno}: not a JSON line; delete the file to start over") from None
            break  # the torn last line of an interrupted run
        if end > len(raw):  # valid JSON but no newline yet: still the torn last line
            break
        records.append(record)
        good_end = end
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def json_ready(x):
    """JSON has no NaN or inf: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def write_json(path: str, obj, indent: int = 2) -> None:
    with atomic(path, "w") as f:
        json.dump(json_ready(obj), f, indent=indent)


def write_jsonl(path: str, records: list) -> None:
    with atomic(path, "w") as f:
        f.writelines(json.dumps(json_ready(r)) + "\n" for r in records)


# -------------------------------------------------------------------------------------------------
# Pickles (the Path-VQA annotations): plain containers only

class Refused(pickle.UnpicklingError):
    """A pickle naming a class or function: refused before anything is built."""


class PlainUnpickler(pickle.Unpickler):
    """Admits lists, dicts, tuples, sets, strings and numbers only: a crafted file cannot run code."""
    SAFE = {("builtins", "set"), ("builtins", "frozenset")}  # protocols <= 3 build sets via a global

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise Refused(f"refused global '{module}.{name}' (the file may hold only plain containers, "
                      f"strings and numbers)")


def read_plain_pickle(path: str, what: str = "pickle"):
    require_file(path, what)
    with open(path, "rb") as f:
        try:
            return PlainUnpickler(f).load()
        except Refused as e:
            raise ValueError(f"{path}: {e}") from None
        except Exception as e:  # truncated, or not a pickle: UnpicklingError, EOFError, ValueError, ...
            raise unreadable(path, f"{what} file", e) from None


# -------------------------------------------------------------------------------------------------
# Arrays (MedMNIST)

def read_npz(path: str, keys: list[str], what: str = ".npz") -> dict[str, np.ndarray]:
    """The named arrays of an .npz, read now: an .npz is a zip, so a truncated copy fails on its
    directory and flipped bytes fail the CRC of the array they hit, here rather than mid-training."""
    require_file(path, what)
    try:
        f = np.load(path)  # allow_pickle=False: object arrays are refused
    except Exception as e:
        raise unreadable(path, f"{what} file", e) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive (a single .npy array?)")
    with f:
        absent = [k for k in keys if k not in f.files]
        if absent:
            raise ValueError(f"{path}: missing array(s) {absent} (it has {sorted(f.files)})")
        arrays = {}
        for key in keys:
            try:
                arrays[key] = f[key]
            except Exception as e:
                raise ValueError(f"{path}: array '{key}' cannot be read (truncated or corrupted?): "
                                 f"{reason(e)}") from None
    return arrays


# -------------------------------------------------------------------------------------------------
# Images

def image_error(path: str, e: Exception) -> ValueError:
    if isinstance(e, UnidentifiedImageError):  # its message is only the path again
        return ValueError(f"{path}: not an image (corrupted, or a format PIL cannot read?)")
    if isinstance(e, Image.DecompressionBombError):  # a valid file, too many pixels to decode safely
        return ValueError(f"{path}: refused, beyond Pillow's decompression-bomb limit: {reason(e)}")
    return unreadable(path, "image", e)


def read_image(path: str) -> Image.Image:
    """The decoded image, as RGB."""
    require_file(path, "image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # not an image, or truncated: PIL may only find out while decoding
        raise image_error(path, e) from None


# The last bytes of a complete file: a JPEG ends with its end-of-image marker, a PNG with its IEND
# chunk. Searched in the last 1 KiB, so a few bytes some writers append after them are allowed.
ENDINGS = {"JPEG": (b"\xff\xd9", "end-of-image marker"), "PNG": (b"IEND", "IEND chunk")}


def read_image_size(path: str) -> tuple[int, int]:
    """(W, H) from the image's header, without decoding its pixels (two small reads), and for a JPEG
    or PNG a check that the file ends as one does: a copy cut short is found here, before training,
    not when the mixture first draws it. Corruption inside the pixel data is found only by decoding."""
    require_file(path, "image")
    with open(path, "rb") as f:
        try:
            with Image.open(f) as image:
                size, ending = image.size, ENDINGS.get(image.format)
        except Exception as e:
            raise image_error(path, e) from None
        if ending:
            f.seek(max(0, os.path.getsize(path) - 1024))
            if ending[0] not in f.read():
                raise ValueError(f"{path}: not a readable image (truncated?): no {ending[1]} at its end")
    return size
