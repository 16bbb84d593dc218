"""Ask a trained Uni-Med about your own image, and see where its experts looked.

    python -m workshop.ask ckpt.pt --image scan.png --ask "[vqa] which side is the lesion on?"
    python -m workshop.ask ckpt.pt --image scan.png < questions.txt     # one question per line

A question fills the slot of its task's evaluation instruction and is answered by
evaluate.answer_batch like every evaluated sample, so the answer is the one evaluation would score.
The answer goes to standard output; pictures go to --out (default `ask_<checkpoint stem>/`): the box
of a [refer] answer or an [identify] question on the image, and the routing map, each expert's
weight on every patch of the image.
"""
import argparse
import os
import re
import sys
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import metrics
from cmoe import token_of_patch
from evaluate import add_model_flags, answer_batch, prompt_note, which_prompt
from lib.checkpoint import read_checkpoint
from lib.files import image_error, require_file
from model import UniMed, build_prompt
from workshop import plot

ASK_TEMPLATES = {  # the evaluation instruction of each task (data.TEMPLATES); the question fills {}
    "vqa": data.TEMPLATES["slake_vqa"][1],
    "refer": data.TEMPLATES["slake_rec"][1],
    "identify": data.TEMPLATES["slake_reg"][1],  # the question is a box {<x1><y1><x2><y2>}
    "caption": "[caption] {} ",  # the evaluation's are whole sentences, each followed by a space
    "cls": data.TEMPLATES["dermamnist"][1],
    "qa": data.TEMPLATES["medqa"][1],
}
DEFAULT_CAPTION = "Describe this input image."  # MedPix's evaluation instruction, for a bare [caption]
BOX_COLOUR = (255, 40, 40)
DISPLAY = 1024  # longest side of the box picture; a larger image is reduced to it
PANEL = 224  # longest side of each panel of the routing map


def read_image(path: str) -> Image.Image:
    """The asked image as 8-bit RGB, or one line saying what is wrong with the file.

    Palette, grey, RGBA, CMYK... are converted as the datasets' images are (Image.convert). 16-bit and
    float images are first stretched from their minimum to their maximum: convert would clip every
    value above 255 to white. The size is left to preprocessing, which resizes to the ViT's input.
    """
    require_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large is fine: it is resized
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not inside the model
                if image.mode.startswith(("I", "F")):
                    pixels = np.asarray(image, dtype=np.float64)
                    lo, span = pixels.min(), max(pixels.max() - pixels.min(), 1e-12)
                    image = Image.fromarray(((pixels - lo) * (255 / span)).round().astype(np.uint8))
                return image.convert("RGB")
    except Exception as e:  # the same one-line errors as the datasets' images (files.image_error)
        raise image_error(path, e) from None


def read_question(line: str, task: str, has_image: bool) -> tuple[str, str, str, Optional[tuple]]:
    """A question, with an optional leading [task] tag that overrides `task` -> (task, question,
    the instruction evaluation builds from it (as TaskDataset.get does), the box an [identify]
    question asks about, on the 0-100 grid)."""
    tagged = re.match(r"\s*\[(\w+)\](.*)", line, re.S)
    if tagged:
        task, line = tagged.groups()
    if task not in ASK_TEMPLATES:
        raise ValueError(f"unknown task [{task}]; the tasks are {', '.join(ASK_TEMPLATES)}")
    if task != "qa" and not has_image:
        raise ValueError(f"a [{task}] question needs an image: give one with --image")
    question = data.process_text(line.strip()) or (DEFAULT_CAPTION if task == "caption" else "")
    if not question:
        raise ValueError(f"the [{task}] question is empty")
    box = None
    if task == "identify":
        m = data.BOX.fullmatch(question.replace(" ", ""))
        box = m and tuple(int(v) for v in m.groups())
        if not box or max(box) > 100 or box[0] >= box[2] or box[1] >= box[3]:
            raise ValueError(f"an [identify] question is a box {{<x1><y1><x2><y2>}} on the 0-100 grid of "
                             f"the image, x1 < x2 and y1 < y2, e.g. {{<10><20><55><70>}}; got {question!r}")
        question = "{{<{}><{}><{}><{}>}}".format(*box)  # as data.box_to_text writes it
    instruction = ASK_TEMPLATES[task].format(question)
    return task, question, data.process_text(instruction) if task == "qa" else instruction, box


@torch.no_grad()
def routing_map(model: UniMed, images: torch.Tensor, task: str) -> Optional[torch.Tensor]:
    """Each expert's weight on each ViT patch of one image: [grid, grid, N], None without experts.

    A resampled token is made from several patches (cmoe.token_of_patch), and its weights go to each
    of them. This runs the ViT and the connector a second time, which is cheap beside generation and
    leaves UniMed.generate exactly as evaluation calls it."""
    with model.autocast():
        weights = model.encode_images(images, task)[1]                      # [1, T, N]
    if weights is None:
        return None
    c, grid = model.connector.config, model.vit.config.grid
    owner = token_of_patch(c.resampler, c.rate, grid * grid).to(weights.device)
    return weights[0, owner].reshape(grid, grid, -1).float().cpu()        # [grid, grid, N]


def resized(image: Image.Image, longest: int) -> tuple[Image.Image, float]:
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BICUBIC), scale


def draw_box(image: Image.Image, box, scale: float = 1.0) -> Image.Image:
    """A copy of `image` with `box` (x1, y1, x2, y2 in pixels of the original, times `scale`) drawn
    inward from its edges. As the +1 pixel IoU counts them, x2 and y2 are pixels of the box."""
    out = image.copy()
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    x2, y2 = min(x2, out.width - 1), min(y2, out.height - 1)
    ImageDraw.Draw(out).rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=max(2, max(out.size) // 200))
    return out


def routing_figure(image: Image.Image, weights: torch.Tensor, title: str, grid_box=None) -> Image.Image:
    """The image, then one translucent panel per expert: its weight on every patch, on one colour
    scale from 0 to the largest weight, with its mean weight over the image in the title."""
    panel, scale = resized(image, PANEL)
    shown = panel if grid_box is None else draw_box(panel, metrics.grid_to_pixels(grid_box, image.size), scale)
    grey = panel.convert("L").convert("RGB")
    top = max(float(weights.max()), 1e-6)
    panels = [plot.stack([shown], horizontal=False, title="image")]
    for k in range(weights.shape[-1]):
        heat = Image.new("RGB", weights.shape[1::-1])
        heat.putdata([plot.colour(plot.VIRIDIS, w / top) for w in weights[..., k].flatten().tolist()])
        heat = heat.resize(panel.size, Image.NEAREST)  # the patch grid covers the whole image
        panels.append(plot.stack([Image.blend(grey, heat, 0.6)], horizontal=False,
                                     title=f"E{k + 1}: mean {float(weights[..., k].mean()):.2f}"))
    bar = Image.new("RGB", (90, panel.height + 56), plot.WHITE)  # room for the ticks' text
    plot.colour_bar(bar, 6, 40, panel.height - 1, plot.VIRIDIS, 0.0, top, "routing weight")
    return plot.stack(panels + [bar], horizontal=True, title=title if len(title) <= 120 else title[:117] + "...")


def ask(model: UniMed, image: Optional[Image.Image], line: str, task: str, out_dir: str, name: str,
        compile: bool = False, official_prompt: bool = False) -> dict:
    """Answer one question about `image` as evaluation would, and write its pictures to out_dir as
    name_box.png ([refer]: the predicted box; [identify]: the asked one) and name_routing.png."""
    task, question, instruction, box = read_question(line, task, image is not None)
    image = None if task == "qa" else image
    sample = data.Sample(name, "ask", task, image, instruction, "", image_size=image and image.size)
    batch, [output] = answer_batch(model, [sample], compile, official_prompt)
    r = {"task": task, "prompt": build_prompt(instruction, image is not None, train=False), "output": output,
         "prediction": metrics.clean_prediction(output, task), "pictures": []}
    if task == "refer":
        box = r["pred_box"] = data.parse_box(r["prediction"])  # None: not a box, so nothing is drawn
    if image is None:
        return r
    pictures = {}
    if box is not None:  # on the image reduced to DISPLAY pixels if larger, scaled as evaluation scales a box
        shown, scale = resized(image, DISPLAY) if max(image.size) > DISPLAY else (image, 1.0)
        pictures["box"] = draw_box(shown, metrics.grid_to_pixels(box, image.size), scale)
    weights = routing_map(model, batch.images, task)
    if weights is not None:
        short = question if len(question) <= 60 else question[:57] + "..."
        pictures["routing"] = routing_figure(image, weights, f"[{task}] {short} -> {r['prediction']}", box)
    os.makedirs(out_dir, exist_ok=True)
    for kind, picture in pictures.items():
        r["pictures"].append(os.path.join(out_dir, f"{name}_{kind}.png"))
        plot.save_png(picture, r["pictures"][-1])
    return r


def unused_name(out_dir: str, stem: str) -> str:
    """stem_N for the first N whose pictures are not in out_dir yet: no earlier answer is overwritten."""
    files, n = os.listdir(out_dir) if os.path.isdir(out_dir) else [], 1
    while any(f.startswith(f"{stem}_{n}_") for f in files):
        n += 1
    return f"{stem}_{n}"


def ask_main(args) -> int:
    """--image / --ask / --task: load the model once, then answer --ask, or every line of standard
    input; returns the number of lines that were not answered."""
    path = args.checkpoint
    image = read_image(args.image) if args.image else None  # a bad file fails before the model loads
    if args.ask is not None:
        read_question(args.ask, args.task, image is not None)  # and so does a malformed question
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)),
                                   f"ask_{os.path.splitext(os.path.basename(path))[0]}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = read_checkpoint(path)
    official_prompt = which_prompt(ckpt, args.official_prompt)
    model = UniMed.from_checkpoint(path, args.llama, args.vit, device, ckpt=ckpt)
    print(prompt_note(official_prompt), file=sys.stderr)
    stem = os.path.splitext(os.path.basename(args.image))[0] if args.image else "text"
    if args.ask is None and sys.stdin.isatty():
        print("one question per line; end with Ctrl-D", file=sys.stderr)
    failed = 0
    for n, line in enumerate([args.ask] if args.ask is not None else sys.stdin, 1):
        if not line.strip():
            continue
        try:
            r = ask(model, image, line, args.task, out, unused_name(out, stem), args.compile, official_prompt)
        except ValueError as e:  # one bad line of standard input does not end the session
            if args.ask is not None:
                raise
            print(f"error: line {n}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(r["prediction"], flush=True)
        if r["pictures"]:
            print(f"  pictures: {', '.join(r['pictures'])}", file=sys.stderr)
    return failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="ckpt.pt from train.py, or an official checkpoint_N.pth")
    p.add_argument("--image", help="the image to ask about")
    p.add_argument("--ask", metavar="QUESTION",
                   help="the question; a leading [task] tag overrides --task. Without --ask, one question "
                        "per line is read from standard input, the model loaded once")
    p.add_argument("--task", choices=list(ASK_TEMPLATES), default="vqa",
                   help="the task of untagged questions (default vqa); [identify] asks about a box "
                        "{<x1><y1><x2><y2>} on the 0-100 grid of the image")
    p.add_argument("--out", help="folder of the pictures (default: ask_<checkpoint stem>/ beside the checkpoint)")
    add_model_flags(p)
    args = p.parse_args(argv)
    try:
        failed = ask_main(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if failed:
        sys.exit(f"error: {failed} of the questions could not be answered (see above)")


if __name__ == "__main__":
    main()
