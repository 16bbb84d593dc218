"""How long train.py's data check (data.check_datasets) takes, on the demo and scaled to the real data.

    python bench/check_data.py [--images 300]

1. The demo: the check exactly as train.py runs it (the training view of every dataset), timed.
2. The cost of one image: files.read_image_size (the check: header, plus the last 1 KiB for a JPEG
   or PNG) against files.read_image (a full decode, what a check by loading would cost), on images
   generated here in the sizes of the real datasets: 512x512 JPEG and PNG, and a 2544x3056 JPEG (a
   MIMIC-CXR-JPG radiograph). Files just written are in the page cache, so these are warm-cache
   figures: on cold storage each image adds one or two small reads (the header, and the tail of a
   file larger than the kernel's read-ahead).
3. The estimate for the real datasets (spec section 7, train sizes): every image row is counted
   as reading its own image, which over-counts (Slake's and Path-VQA's questions share images, REC
   and REG share SA-Med2D's), so the estimate is an upper bound for warm storage.
"""
import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from lib import files  # noqa: E402
from workshop.demo import make_demo  # noqa: E402

# spec section 7, paper Table 4: training rows that name an image file (MedMNIST's arrays are read
# when the dataset is loaded, and text QA rows have no image: the check does nothing for them)
IMAGE_ROWS = {"slake_vqa": 6018, "path_vqa": 19755, "mimic_cxr": 9997, "medpix": 31416, "slake_rec": 1421,
              "slake_reg": 1421, "sa_med2d_rec": 20000, "sa_med2d_reg": 20000}
OTHER_ROWS = {"medqa": 10178, "pubmedqa": 500, "dermamnist": 7007, "organsmnist": 13932}
KIND_OF = {"mimic_cxr": "jpeg 2544x3056", "slake_vqa": "jpeg 512", "slake_rec": "jpeg 512", "slake_reg": "jpeg 512",
           "path_vqa": "jpeg 512", "medpix": "png 512", "sa_med2d_rec": "png 512", "sa_med2d_reg": "png 512"}


def picture(rng, W, H):
    """A radiograph-like image: a smooth body, some structure, sensor noise (compresses like one)."""
    y, x = np.mgrid[0:H, 0:W] / max(W, H)
    body = 120 + 80 * np.cos(6 * x + rng.uniform(0, 6)) * np.sin(4 * y + rng.uniform(0, 6))
    grey = (body + rng.normal(0, 6, (H, W))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def per_image(kind, n, directory, rng):
    """Seconds per image of the header check and of a full decode, over n generated files."""
    fmt, size = kind.split()
    W, H = (512, 512) if size == "512" else map(int, size.split("x"))
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"{fmt}{size}_{i}.{'jpg' if fmt == 'jpeg' else 'png'}")
        buf = io.BytesIO()
        picture(rng, W, H).save(buf, "JPEG" if fmt == "jpeg" else "PNG", quality=90)
        open(path, "wb").write(buf.getvalue())
        paths.append(path)
    mean_kb = sum(os.path.getsize(p) for p in paths) / n / 1024
    times = {}
    for name, read in (("header", files.read_image_size), ("decode", files.read_image)):
        best = float("inf")
        for _ in range(3):  # best of 3 passes over all files: the machine is shared
            start = time.perf_counter()
            for p in paths:
                read(p)
            best = min(best, (time.perf_counter() - start) / n)
        times[name] = best
    return times, mean_kb


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="generated images per kind (the 2544x3056 JPEG: a tenth)")
    p.add_argument("--demo", help="demo data root (default: build one in a temporary directory)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.demo or os.path.join(tmp, "demo")
        if not args.demo:
            make_demo(root)
        start = time.perf_counter()
        datasets = data.load_datasets(root, "train", train=True)
        loaded = time.perf_counter() - start
        rows = sum(len(d) for d in datasets.values())
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            problems = data.check_datasets(datasets)
            best = min(best, time.perf_counter() - start)
        images = len({r.image for d in datasets.values() for r in d.rows if isinstance(r.image, str)})
        print(f"demo: {rows} training rows of {len(datasets)} datasets ({images} image files): loading "
              f"{loaded:.2f} s, the check {best:.3f} s ({len(problems)} problems)")

        costs = {}
        for kind in ("jpeg 512", "png 512", "jpeg 2544x3056"):
            n = args.images if "512" in kind else max(3, args.images // 10)
            times, kb = per_image(kind, n, tmp, rng)
            costs[kind] = times
            print(f"{kind:15s} ({n} files, {kb:6.0f} KiB each): header check {times['header'] * 1e6:6.0f} us, "
                  f"full decode {times['decode'] * 1e3:7.2f} ms ({times['decode'] / times['header']:.0f}x)")

    header = sum(IMAGE_ROWS[name] * costs[KIND_OF[name]]["header"] for name in IMAGE_ROWS)
    decode = sum(IMAGE_ROWS[name] * costs[KIND_OF[name]]["decode"] for name in IMAGE_ROWS)
    print(f"real data (spec section 7, train): {sum(IMAGE_ROWS.values())} image rows (and "
          f"{sum(OTHER_ROWS.values())} rows without an image file): the check about {header:.0f} s; "
          f"a full decode of every image instead about {decode / 60:.0f} min (warm cache, one process)")

if __name__ == "__main__":
    main()
