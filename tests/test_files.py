"""lib/files.py: every reader names the file when it fails, for a truncated and for a garbage copy of
each kind of file the project reads; the command lines then exit with that one line."""
import csv
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from lib import files
import train
from workshop.demo import write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image(fmt):
    """A noisy 96x64 image, so that its compressed pixels are most of the file."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def safetensors_bytes(tmp_path):
    save_file({"weight": torch.randn(64, 32), "bias": torch.randn(64)}, tmp_path / "w.safetensors")
    return (tmp_path / "w.safetensors").read_bytes()


def torch_bytes(tmp_path):
    torch.save({"model": {"w": torch.randn(256, 256)}, "step": 3}, tmp_path / "w.pt")  # 256 KiB, as a zip
    return (tmp_path / "w.pt").read_bytes()


def sentencepiece_bytes(tmp_path):
    words = ["liver", "lung", "left", "right", "upper", "lower", "image", "shows", "a", "the"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    write_tokenizer(texts, str(tmp_path / "tokenizer.model"), 400)
    return (tmp_path / "tokenizer.model").read_bytes()


def npz_bytes(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", train_images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
             train_labels=np.arange(8, dtype=np.uint8)[:, None])
    return (tmp_path / "a.npz").read_bytes()


def csv_bytes(tmp_path):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(
        [["name", "context", "type"]] + [[f"MPX{i}.png", f"a mass on the left side, case {i}.", "caption"] for i in range(9)])
    return buf.getvalue().encode()


# kind: (extension, bytes of a good file, its reader)
KINDS = {
    "safetensors": (".safetensors", safetensors_bytes,
                    lambda p: files.load_safetensors(nn.Linear(32, 64, device="meta"), [p], lambda k: k, torch.float32)),
    "torch checkpoint": (".pt", torch_bytes, files.read_torch),
    "sentencepiece": (".model", sentencepiece_bytes, files.read_sentencepiece),
    "json": (".json", lambda t: json.dumps({str(i): {"QUESTION": f"q {i}?"} for i in range(20)}).encode(), files.read_json),
    "jsonl": (".jsonl", lambda t: "".join(json.dumps({"question": f"q {i}?", "answer": "a"}) + "\n"
                                          for i in range(20)).encode(), files.read_jsonl),
    "csv": (".csv", csv_bytes, files.read_csv),
    "text": (".txt", lambda t: b"\xe2\x9c\x93 xmlab0\nxmlab1\n", files.read_text),
    "pickle": (".pkl", lambda t: pickle.dumps([{"img_id": f"train_{i:04d}", "label": {"yes": 1}} for i in range(20)],
                                              protocol=4), files.read_plain_pickle),
    "npz": (".npz", npz_bytes, lambda p: files.read_npz(p, ["train_images", "train_labels"])),
    "jpeg": (".jpg", lambda t: image("JPEG"), files.read_image),
    "png": (".png", lambda t: image("PNG"), files.read_image),
    "jpeg header": (".jpg", lambda t: image("JPEG"), files.read_image_size),
    "png header": (".png", lambda t: image("PNG"), files.read_image_size),
}
# A text file cut at a line end is whole as far as anyone can tell, so these are cut inside a line
# (JSON lines, CSV) or, for plain text, inside a UTF-8 character (a list of names cut short is found
# when a name on it is not).
CUT = {"jsonl": lambda raw: raw.index(b"\n", len(raw) // 2) - 5, "csv": lambda raw: raw.index(b"\n", len(raw) // 2) - 20,
       "text": lambda raw: 1}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_every_reader_names_the_file(kind, damage, tmp_path):
    ext, make, read = KINDS[kind]
    raw = make(tmp_path)
    good = str(tmp_path / f"good{ext}")
    open(good, "wb").write(raw)
    read(good)  # the good file reads
    bad = str(tmp_path / f"{damage}{ext}")
    cut = CUT.get(kind, lambda raw: len(raw) // 2)(raw)
    open(bad, "wb").write({"truncated": raw[:cut], "empty": b"",
                           "garbage": np.random.default_rng(1).bytes(len(raw))}[damage])
    with pytest.raises(ValueError) as e:
        read(bad)
    assert str(e.value).startswith(bad + ":") or str(e.value).startswith(bad + ", row"), str(e.value)
    assert "\n" not in str(e.value), "one line"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        read(str(tmp_path / f"absent{ext}"))


def test_messages_for_truncated_files_say_what_is_wrong(tmp_path):
    """The exact wording for the cases the issue reported (a truncated .safetensors, .pth, pickle,
    npz, and an npz with flipped bytes)."""
    def write(name, content):
        open(tmp_path / name, "wb").write(content)
        return str(tmp_path / name)
    raw = safetensors_bytes(tmp_path)
    path = write("cut.safetensors", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file \(truncated or "
                                         r"corrupted\?\): Error while deserializing header"):
        files.load_safetensors(nn.Linear(32, 64, device="meta"), [path], lambda k: k, torch.float32)
    raw = torch_bytes(tmp_path)
    path = write("cut.pt", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: cannot be read as a checkpoint .*: PytorchStreamReader failed "
                                         r"reading zip archive: failed finding central directory$"):
        files.read_torch(path)
    raw = pickle.dumps([{"a": i} for i in range(50)])
    path = write("cut.pkl", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.pkl: not a readable pickle file .*: pickle data was truncated"):
        files.read_plain_pickle(path)
    raw = npz_bytes(tmp_path)
    path = write("cut.npz", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz file .*: File is not a zip file"):
        files.read_npz(path, ["train_images"])
    flipped = bytearray(raw)
    start = raw.index(b"train_images.npy") + 200  # past the local header: inside the array's bytes
    flipped[start:start + 16] = bytes(b ^ 0xFF for b in flipped[start:start + 16])
    path = write("flipped.npz", bytes(flipped))
    with pytest.raises(ValueError, match=r"flipped\.npz: array 'train_images' cannot be read \(truncated or "
                                         r"corrupted\?\): Bad CRC-32 for file 'train_images.npy'"):
        files.read_npz(path, ["train_images"])


def test_hostile_pickles_are_refused_by_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))
    for protocol in (2, 4):
        path = str(tmp_path / f"hostile{protocol}.pkl")
        open(path, "wb").write(pickle.dumps([{"label": Payload()}], protocol=protocol))
        with pytest.raises(ValueError, match=r"hostile\d\.pkl: refused global '(posix|os|nt)\.system'"):
            files.read_plain_pickle(path)
        torch_path = path[:-4] + ".pt"
        open(torch_path, "wb").write(pickle.dumps({"model": Payload()}, protocol=protocol))
        with pytest.raises(ValueError, match=r"hostile\d\.pt: cannot be read as a checkpoint"):
            files.read_torch(torch_path)
    assert not os.path.exists(tmp_path / "ran")


def test_a_truncated_image_is_found_from_its_header_and_end(tmp_path):
    """read_image_size decodes no pixels, yet finds a JPEG or PNG cut anywhere after its header."""
    for ext, fmt in ((".jpg", "JPEG"), (".png", "PNG")):
        raw = image(fmt)
        for keep in (0.3, 0.6, 0.99):
            path = str(tmp_path / f"cut{keep}{ext}")
            open(path, "wb").write(raw[: int(len(raw) * keep)])
            with pytest.raises(ValueError, match=rf"cut{keep}\{ext}: not a readable image \(truncated"):
                files.read_image_size(path)
        path = str(tmp_path / f"trailing{ext}")
        open(path, "wb").write(raw + b"\0" * 100)  # a few bytes after the end are tolerated, as PIL does
        assert files.read_image_size(path) == (96, 64) and files.read_image(path).size == (96, 64)


def test_an_image_beyond_the_decompression_bomb_limit_is_refused_in_one_line(tmp_path):
    """A valid 15000 x 15000 PNG (1 bit a pixel, all black: 27 KB) is over Pillow's limit; both readers
    say so, rather than asking whether the file is truncated."""
    path = str(tmp_path / "huge.png")
    Image.new("1", (15000, 15000)).save(path)
    for reader in (files.read_image, files.read_image_size):
        with pytest.raises(ValueError) as e:
            reader(path)
        message = str(e.value)
        assert message.startswith(f"{path}: refused, beyond Pillow's decompression-bomb limit: Image size "
                                  "(225000000 pixels) exceeds limit of"), message
        assert "\n" not in message and "truncated" not in message


def test_read_log_cuts_a_torn_last_line_and_rejects_a_broken_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert files.read_log(str(path)) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # so the next append starts on a fresh line
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not a JSON line"):
        files.read_log(str(path))
    path.write_bytes(b'{"id": "a"}\n\xff\xfe\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not a JSON line"):
        files.read_log(str(path))


# -------------------------------------------------------------------------------------------------
# The command lines: the one line, last, and a non-zero exit

def test_eva_convert_exits_with_the_file_named(tmp_path):
    raw = torch_bytes(tmp_path)
    path = str(tmp_path / "eva_vit_g.pth")
    open(path, "wb").write(raw[: len(raw) // 2])
    result = subprocess.run([sys.executable, "-m", "workshop.convert", path, str(tmp_path / "o.st")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"workshop.convert: {path}: cannot be read as a checkpoint (EVA ViT-G .pth)"), last
    assert "Traceback" not in result.stderr


def test_train_resume_from_a_bad_checkpoint_exits_with_the_file_named(tmp_path):
    raw = torch_bytes(tmp_path)
    path = str(tmp_path / "ckpt.pt")
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(SystemExit, match=rf"^train.py: {path}: cannot be read as a checkpoint"):
        train.main(["--resume", path])
    torch.save({"model": {"llm_proj.weight": torch.zeros(2)}}, path)  # an official checkpoint: no optimizer
    with pytest.raises(SystemExit, match=rf"^train.py: {path}: not a checkpoint of train.py"):
        train.main(["--resume", path])
