"""workshop/ask.py, asking about an image: the answer is evaluation's, boxes land on the pixels evaluation scales
them to, the routing map is the router's weights laid back onto the patches, standard input is
answered with one model load, and bad images get one line naming the file.

A tiny UniMed with random trainable weights on the demo's base weights (built without the LLaMA
pre-training), as in test_evaluate.py.
"""
import io
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
from lib.checkpoint import FORMAT
import evaluate
from workshop import ask as ask_cli
import metrics
from cmoe import ConnectorConfig
from model import UniMed, UniMedConfig
from workshop.demo import DEMO_EVA, DEMO_PRETRAIN, build_demo, demo_paths

BOX_COLOUR = ask_cli.BOX_COLOUR


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    build_demo(root, pretrain={**DEMO_PRETRAIN, "steps": 0})
    return demo_paths(root)


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    """(path, model): a soft router over 3 experts, every trainable weight random (LoRA B included)."""
    llama_dir, vit_path, data_root = demo
    torch.manual_seed(0)
    model = UniMed.from_pretrained(llama_dir, vit_path, UniMedConfig(connector=ConnectorConfig(experts=3)),
                                   vit_config=DEMO_EVA, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    config = {"unimed": model.config.to_dict(), "vit": asdict(DEMO_EVA), "llama_dir": llama_dir,
              "vit_path": vit_path, "data_root": data_root, "demo": True, "args": {}}
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    torch.save({"format": FORMAT, "step": 0, "config": config, "model": model.trainable_state_dict()}, path)
    return path, model.eval()


@pytest.fixture(autouse=True)
def short_answers(monkeypatch):
    monkeypatch.setattr(evaluate, "MAX_NEW_TOKENS", 8)  # random weights never emit eos


@pytest.fixture
def loads(monkeypatch, checkpoint):
    """Counts model loads; each load hands out the fixture's model."""
    calls = []

    def from_checkpoint(cls, path, *args, **kwargs):
        calls.append(path)
        return checkpoint[1]
    monkeypatch.setattr(UniMed, "from_checkpoint", classmethod(from_checkpoint))
    return calls


def grey_png(path, size, mode="RGB"):
    Image.new(mode, size, 128 if mode in ("L", "P") else (128,) * len(mode)).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ answers

QUESTIONS = {  # dataset -> the question a user types to get sample i's evaluation instruction
    "slake_vqa": lambda row, sample: row.slot,
    "slake_rec": lambda row, sample: row.slot,
    "sa_med2d_reg": lambda row, sample: data.box_to_text(sample.box, sample.image_size),
    "medpix": lambda row, sample: "Describe this input image.",
    "mimic_cxr": lambda row, sample: "Describe the given chest x-ray image in detail.",
    "dermamnist": lambda row, sample: data.CLS_QUESTIONS["dermamnist"],
    "medqa": lambda row, sample: row.slot,
}


def test_answer_equals_evaluation(checkpoint, demo, tmp_path, monkeypatch):
    """Asking a test sample's question about its image (saved losslessly, as a user's file) gives
    evaluate.py's prompt, raw output and prediction, although evaluate.py batched and left-padded."""
    model = checkpoint[1]
    monkeypatch.setattr(metrics, "score_sample", lambda task, r: {})  # scores are not compared (speed)
    datasets = data.load_datasets(demo[2], "test", names=list(QUESTIONS), train=False)
    for name, question in QUESTIONS.items():
        ds = datasets[name]
        records = evaluate.evaluate_dataset(model, name, ds, str(tmp_path), evaluate.CPU_BATCH_SIZE, limit=2)
        assert len(records) == 2
        for i, record in enumerate(records):
            sample = ds[i]
            image = None
            if sample.image is not None:
                sample.image.save(tmp_path / "sample.png")
                image = ask_cli.read_image(str(tmp_path / "sample.png"))
            line = f"[{ds.task}] {question(ds.rows[i], sample)}"
            r = ask_cli.ask(model, image, line, "vqa", str(tmp_path), f"{name}_{i}")
            assert r["prompt"] == record["prompt"], (name, i)
            assert (r["output"], r["prediction"]) == (record["output"], record["prediction"]), (name, i)


def test_official_prompt_passes_through(checkpoint, demo, tmp_path, monkeypatch, loads, capsys):
    """--official-prompt (two BOS, issue 14) reaches UniMed.generate from the ask mode as from
    evaluation, with the same answers; by default it is off for our checkpoints."""
    path, model = checkpoint
    monkeypatch.setattr(metrics, "score_sample", lambda task, r: {})
    ds = data.load_datasets(demo[2], "test", names=["slake_vqa"], train=False)["slake_vqa"]
    records = evaluate.evaluate_dataset(model, "slake_vqa", ds, str(tmp_path), evaluate.CPU_BATCH_SIZE,
                                        limit=2, official_prompt=True)
    seen, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: seen.append(kw["official_prompt"]) or generate(*a, **kw))
    for i, record in enumerate(records):
        ds[i].image.save(tmp_path / "sample.png")
        r = ask_cli.ask(model, ask_cli.read_image(str(tmp_path / "sample.png")), ds.rows[i].slot, "vqa",
                         str(tmp_path), "s", official_prompt=True)
        assert r["output"] == record["output"]
    image = str(tmp_path / "sample.png")
    ask_cli.main([path, "--image", image, "--ask", "which side?", "--out", str(tmp_path)])
    ask_cli.main([path, "--image", image, "--ask", "which side?", "--out", str(tmp_path), "--official-prompt"])
    assert seen == [True, True, False, True]
    assert "prompt: one BOS" in capsys.readouterr().err


def test_question_forms():
    """--task for untagged questions, a tag overriding it, and errors that list the tasks."""
    assert ask_cli.read_question("which side?", "vqa", True) == (
        "vqa", "which side?", "[vqa] Based on the image, respond to this question with a short answer: which side?", None)
    assert ask_cli.read_question("  [refer]  the  liver ", "vqa", True)[2] == "[refer] give me the location of the liver"
    assert ask_cli.read_question("[caption]", "vqa", True)[2] == "[caption] Describe this input image. "
    assert ask_cli.read_question("[identify] {<1><2> <30><40>}", "vqa", True)[2:] == (
        "[identify] what object is in this location {<1><2><30><40>}", (1, 2, 30, 40))
    for line, words in (("[foo] what?", ["unknown task [foo]", "vqa, refer, identify, caption, cls, qa"]),
                        ("[identify] the liver", ["{<x1><y1><x2><y2>}"]),
                        ("[identify] {<50><2><30><40>}", ["x1 < x2"]),
                        ("[vqa]   ", ["empty"])):
        with pytest.raises(ValueError) as e:
            ask_cli.read_question(line, "vqa", True)
        assert all(w in str(e.value) for w in words), str(e.value)


# ----------------------------------------------------------------------------------------- pictures

def box_pixels(picture, y, xs):
    return [picture.getpixel((x, y)) == BOX_COLOUR for x in xs]


def test_boxes_are_drawn_at_the_pixels_evaluation_scales_to(checkpoint, tmp_path, monkeypatch):
    model = checkpoint[1]
    image = ask_cli.read_image(grey_png(tmp_path / "scan.png", (200, 100)))
    # [refer]: the predicted box. 0-100 grid -> pixels of a 200 x 100 image, by hand:
    # x 10 -> 20, 60 -> 120; y 20 -> 20, 90 -> 90; the outline (2 px) is drawn inward from them
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: ["{<10><20><60><90>} "])
    r = ask_cli.ask(model, image, "[refer] the lesion", "vqa", str(tmp_path), "refer")
    assert r["pred_box"] == (10, 20, 60, 90)
    assert [os.path.basename(p) for p in r["pictures"]] == ["refer_box.png", "refer_routing.png"]
    picture = Image.open(r["pictures"][0]).convert("RGB")
    assert picture.size == (200, 100)
    assert box_pixels(picture, 55, [19, 20, 21, 22, 70, 118, 119, 120, 121]) == [0, 1, 1, 0, 0, 0, 1, 1, 0]
    assert box_pixels(picture, 19, [70]) + box_pixels(picture, 20, [19, 20, 70, 120, 121]) == [0, 0, 1, 1, 1, 0]
    assert box_pixels(picture, 90, [19, 20, 70, 120, 121]) + box_pixels(picture, 91, [70]) == [0, 1, 1, 1, 0, 0]
    # [identify]: the asked box: x 5 -> 10, 50 -> 100; y 10 -> 10, 80 -> 80
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: ["liver"])
    r = ask_cli.ask(model, image, "[identify] {<5><10><50><80>}", "vqa", str(tmp_path), "identify")
    picture = Image.open(r["pictures"][0]).convert("RGB")
    assert box_pixels(picture, 45, [9, 10, 11, 12, 99, 100, 101]) == [0, 1, 1, 0, 1, 1, 0]
    assert box_pixels(picture, 9, [50]) + box_pixels(picture, 10, [50]) + box_pixels(picture, 80, [50]) == [0, 1, 1]
    # an answer that is not a box draws nothing but the routing map
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: ["upper left"])
    r = ask_cli.ask(model, image, "[refer] the lesion", "vqa", str(tmp_path), "miss")
    assert r["pred_box"] is None and [os.path.basename(p) for p in r["pictures"]] == ["miss_routing.png"]


def test_routing_map_lays_each_tokens_weights_on_its_patches(checkpoint, demo, tmp_path):
    model = checkpoint[1]
    image = data.load_datasets(demo[2], "test", names=["slake_vqa"], train=False)["slake_vqa"][0].image
    images = data.collate([data.Sample("s", "x", "vqa", image, "[vqa] q", "")], model.image_size).images
    weights = ask_cli.routing_map(model, images, "vqa")
    grid = model.vit.config.grid
    assert weights.shape == (grid, grid, 3)
    # the soft router: every patch's weights over the experts sum to 1 (Eq. 14)
    assert torch.allclose(weights.sum(-1), torch.ones(grid, grid), atol=1e-6)
    # projection a=4: the 4 patches of a run along a row share their token's weights
    with torch.no_grad():
        tokens = model.encode_images(images, "vqa")[1][0]                    # [T, 3]
    for p in range(grid * grid):
        assert torch.equal(weights[p // grid, p % grid], tokens[p // 4])
    # the figure: the image and one panel per expert, side by side
    picture = ask_cli.routing_figure(image, weights, "[vqa] q -> a")
    assert picture.width > 4 * ask_cli.PANEL


def test_no_routing_map_without_experts(demo, tmp_path):
    llama_dir, vit_path, _ = demo
    model = UniMed.from_pretrained(llama_dir, vit_path, UniMedConfig(connector=ConnectorConfig(connector="mlp")),
                                   vit_config=DEMO_EVA, dtype=torch.float32).eval()
    image = ask_cli.read_image(grey_png(tmp_path / "scan.png", (64, 64)))
    r = ask_cli.ask(model, image, "[vqa] which side?", "vqa", str(tmp_path), "mlp")
    assert r["pictures"] == []


# ----------------------------------------------------------------------------------- the command line

def test_standard_input_three_questions_one_load(checkpoint, loads, tmp_path, monkeypatch, capsys):
    image = grey_png(tmp_path / "scan.png", (80, 60))
    monkeypatch.setattr(sys, "stdin", io.StringIO("[vqa] which side?\n\n[refer] the lesion\n[caption]\n"))
    ask_cli.main([checkpoint[0], "--image", image, "--out", str(tmp_path / "out")])
    assert len(loads) == 1
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["scan_1_routing.png", "scan_2_routing.png", "scan_3_routing.png"]
    # the same questions one by one (--ask) give the same answers
    for line, answer in zip(["which side?", "[refer] the lesion", "[caption]"], answers):
        ask_cli.main([checkpoint[0], "--image", image, "--ask", line, "--out", str(tmp_path / "one")])
        assert capsys.readouterr().out == answer + "\n"
    assert len(os.listdir(tmp_path / "one")) == 3  # each run numbers its pictures after the last one


def test_a_bad_line_of_standard_input_does_not_end_the_session(checkpoint, loads, tmp_path, monkeypatch, capsys):
    image = grey_png(tmp_path / "scan.png", (80, 60))
    monkeypatch.setattr(sys, "stdin", io.StringIO("[foo] what?\n[vqa] which side?\n"))
    with pytest.raises(SystemExit) as e:
        ask_cli.main([checkpoint[0], "--image", image, "--out", str(tmp_path / "out")])
    assert "1 of the questions" in str(e.value)
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "line 1: unknown task [foo]" in err


def test_unknown_task_lists_the_tasks(checkpoint, loads, tmp_path, capsys):
    image = grey_png(tmp_path / "scan.png", (80, 60))
    with pytest.raises(SystemExit) as e:
        ask_cli.main([checkpoint[0], "--image", image, "--ask", "[vgq] which side?"])
    assert str(e.value) == "error: unknown task [vgq]; the tasks are vqa, refer, identify, caption, cls, qa"
    with pytest.raises(SystemExit):
        ask_cli.main([checkpoint[0], "--image", image, "--task", "vgq", "--ask", "which side?"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(task in err for task in ask_cli.ASK_TEMPLATES)
    assert loads == []  # both refused before the model loads


def test_text_only_questions_need_no_image(checkpoint, loads, tmp_path, capsys):
    ask_cli.main([checkpoint[0], "--ask", "[qa] which organ filters the blood?", "--out", str(tmp_path)])
    assert len(capsys.readouterr().out.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        ask_cli.main([checkpoint[0], "--ask", "which side?"])
    assert "needs an image" in str(e.value) and "--image" in str(e.value)


# --------------------------------------------------------------------------------------- bad images

def test_bad_image_files_get_one_line_naming_the_file(checkpoint, loads, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:-200])
    (tmp_path / "notes.png").write_text("not an image\n")
    for path in (tmp_path / "missing.png", tmp_path / "notes.png", tmp_path / "truncated.png", tmp_path):
        with pytest.raises(SystemExit) as e:
            ask_cli.main([checkpoint[0], "--image", str(path), "--ask", "which side?"])
        message = str(e.value)
        assert message.startswith(f"error: {path}: ") and "\n" not in message, message
    assert loads == []


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F"])
def test_other_modes_become_rgb(mode, tmp_path):
    if mode.startswith(("I", "F")):  # a 12-bit ramp: stretched to 0..255, not clipped to white
        ramp = np.arange(64 * 64).reshape(64, 64)
        image = Image.fromarray(ramp.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert image.mode == mode
    else:
        image = Image.new(mode, (64, 48))
    path = tmp_path / ("scan.tiff" if mode in ("CMYK", "I", "F") else "scan.png")
    image.save(path)
    rgb = ask_cli.read_image(str(path))
    assert rgb.mode == "RGB" and rgb.size == image.size
    if mode.startswith(("I", "F")):
        values = np.asarray(rgb)[..., 0]
        assert values.min() == 0 and values.max() == 255 and values[32, 0] == round(2048 / 4095 * 255)


def test_a_very_large_image_is_answered_and_drawn_reduced(checkpoint, tmp_path, monkeypatch):
    model = checkpoint[1]
    path = tmp_path / "large.png"
    Image.new("L", (6000, 3000), 90).save(path)
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: ["{<10><20><60><90>}"])
    r = ask_cli.ask(model, ask_cli.read_image(str(path)), "[refer] it", "vqa", str(tmp_path), "large")
    picture = Image.open(r["pictures"][0]).convert("RGB")
    assert picture.size == (1024, 512)
    # x1 = 10/100 * 6000 = 600 px of the original, shown at 1024/6000: round(102.4) = 102
    assert box_pixels(picture, 300, [101, 102]) == [0, 1]
