"""train.py end to end on a tiny demo: learning, checkpoints, the curves picture, exact resume, atomic
saves, NaN stop, no host reads between log steps, DataLoader workers, DDP on gloo, and one step of
every Table 2 ablation.

One tiny demo (make_demo, a tiny EVA, a briefly pre-trained tiny LLaMA) is built once for the
module; every test trains from it on CPU in fp32 and writes into its own tmp_path.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from workshop import curves as curves_cli
import data
from lib.checkpoint import FORMAT
from workshop import demo as workshop_demo
from lib import files
from workshop.ops import OpCounter
import train
from model import UniMed
from workshop.demo import build_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLAMA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, vocab_size=400, max_seq_len=512)
TINY_EVA = train.EVAConfig(img_size=28, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
TINY_PRETRAIN = dict(steps=0, batch=8, block=64, lr=3e-3)  # a random LLaMA: fast, still learnable
FAST = ["--router-hidden", "32", "--log-every", "1", "--device", "cpu", "--save-every", "0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A directory holding a tiny demo/ (what train.py builds when given no weights), made once."""
    root = tmp_path_factory.mktemp("demo_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workshop_demo, "DEMO_LLAMA", TINY_LLAMA)
        mp.setattr(workshop_demo, "DEMO_EVA", TINY_EVA)
        mp.chdir(root)
        build_demo(pretrain=TINY_PRETRAIN)
    return root


@pytest.fixture
def run(demo, monkeypatch, tmp_path):
    """run(*flags, out=, stop_at=) trains in the demo directory -> (checkpoint, log records, path)."""
    monkeypatch.setattr(workshop_demo, "DEMO_EVA", TINY_EVA)
    monkeypatch.chdir(demo)

    def run(*flags, out="ckpt.pt", stop_at=None):
        path = str(tmp_path / out)
        train.main([*FAST, "--out", path, *flags], stop_at=stop_at)
        log = [json.loads(line) for line in open(path[:-3] + ".jsonl")]
        return torch.load(path, map_location="cpu", weights_only=True), log, path
    return run


def only(monkeypatch, *names):
    """Restrict the training mixture to some datasets (so that a single step reaches the connector)."""
    load = data.load_datasets
    monkeypatch.setattr(data, "load_datasets",
                        lambda *a, **k: {n: d for n, d in load(*a, **k).items() if n in names})


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), \
            f"{name}: max diff {(a[name] - b[name]).abs().max().item():.3g}"


def test_demo_run_learns_and_writes_a_checkpoint(run, tmp_path):
    ckpt, log, path = run("--iters", "50", "--lr", "2e-2")
    assert ckpt["format"] == FORMAT and ckpt["step"] == 50
    assert {"config", "model", "optimizer", "scheduler", "sampler", "rng"} <= set(ckpt)
    assert ckpt["config"]["demo"] is True and ckpt["config"]["args"]["iters"] == 50
    model = UniMed.from_pretrained(ckpt["config"]["llama_dir"], ckpt["config"]["vit_path"],
                                   train.UniMedConfig.from_dict(ckpt["config"]["unimed"]),
                                   vit_config=train.EVAConfig(**ckpt["config"]["vit"]), dtype=torch.float32)
    trainable = model.trainable_state_dict()
    assert ckpt["model"].keys() == trainable.keys()  # trainable weights only, nothing frozen
    assert sum(t.numel() for t in ckpt["model"].values()) < sum(p.numel() for p in model.parameters()) / 2
    model.load_trainable_state_dict(ckpt["model"])
    losses = [r["loss"] for r in log]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # a random tiny LLaMA starts at ~ln(vocab) on every task, so a steady 0.1 drop is learning
    assert last < first - 0.1, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    assert {"step", "loss", "task_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "routing"} <= set(log[-1])
    routed = [w for r in log for w in r["routing"].values()]
    assert routed and all(len(w) == 5 and abs(sum(w) - 1) < 1e-3 for w in routed)
    # its curves: one loss curve per task of the log, every step once
    _, curves = curves_cli.plot_training(path[:-3] + ".jsonl", str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.width == 900
    assert set(curves["loss"]) == {t for r in log for t in r["task_loss"]}
    assert set(curves["routing"]) == {t for r in log for t in r["routing"]}
    assert all(steps == sorted(set(steps)) for steps, _ in curves["loss"].values())


def test_resume_is_exact_and_its_log_has_no_repeated_steps(run, tmp_path):
    straight, straight_log, _ = run("--iters", "8", out="straight.pt")
    half, _, path = run("--iters", "8", out="resumed.pt", stop_at=4)
    assert half["step"] == 4
    # a run killed at step 6 whose last checkpoint is step 4's: its log has steps 5, 6 and a torn line
    shutil.copy(path, tmp_path / "step4.pt")
    train.main(["--resume", path, "--out", path], stop_at=6)
    with open(path[:-3] + ".jsonl", "a") as log:
        log.write('{"step": 7, "lo')
    shutil.copy(tmp_path / "step4.pt", path)
    train.main(["--resume", path, "--out", path])  # every other flag comes from the checkpoint
    resumed = torch.load(path, map_location="cpu", weights_only=True)
    assert resumed["step"] == 8
    assert_same_weights(straight["model"], resumed["model"])
    for key, value in straight["sampler"].items():
        assert torch.equal(value, resumed["sampler"][key]) if torch.is_tensor(value) else value == resumed["sampler"][key]
    exp_avg = lambda ckpt: [s["exp_avg"] for s in ckpt["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg(straight), exp_avg(resumed)))
    log = [json.loads(line) for line in open(path[:-3] + ".jsonl")]
    assert [r["step"] for r in log] == [r["step"] for r in straight_log] == list(range(1, 9))
    assert [(r["loss"], r["lr"]) for r in log] == [(r["loss"], r["lr"]) for r in straight_log]


def test_low_memory_resumes_exactly_and_logs_the_gradient_norm(run, tmp_path):
    # --low-memory: AdamW steps each weight in the backward, bf16 moments (lib/optim.py); chunks of
    # 2^10 elements, so that the tiny connector's Linears (the router's first: 32 x 256 weights) are split too
    flags = ["--iters", "6", "--low-memory"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "AdamWInBackward", functools.partial(train.AdamWInBackward, chunk=2**10))
        straight, straight_log, _ = run(*flags, out="straight.pt")
        _, _, path = run(*flags, out="resumed.pt", stop_at=3)
        train.main(["--resume", path, "--out", path])
    resumed = torch.load(path, map_location="cpu", weights_only=True)
    assert resumed["step"] == 6 and resumed["config"]["args"]["low_memory"] is True
    assert_same_weights(straight["model"], resumed["model"])
    moments = lambda ckpt: [t for s in ckpt["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert all(t.dtype == torch.bfloat16 for t in moments(resumed))
    assert all(torch.equal(a, b) for a, b in zip(moments(straight), moments(resumed)))
    log = [json.loads(line) for line in open(path[:-3] + ".jsonl")]
    assert [(r["loss"], r["grad_norm"]) for r in log] == [(r["loss"], r["grad_norm"]) for r in straight_log]
    # step 1 starts from the same weights as the standard path: the same gradient, summed otherwise
    _, standard_log, _ = run("--iters", "1", out="standard.pt")
    assert straight_log[0]["loss"] == standard_log[0]["loss"]
    assert straight_log[0]["grad_norm"] == pytest.approx(standard_log[0]["grad_norm"], rel=1e-4)


def test_low_memory_refuses_grad_accum_and_ddp(run):
    with pytest.raises(SystemExit, match=r"^train.py: --low-memory steps each weight inside its backward.*--grad-accum 1$"):
        run("--iters", "1", "--low-memory", "--grad-accum", "2")
    with pytest.raises(ValueError, match="average over processes"):
        train.setup(train.parse_args([*FAST, "--low-memory"]), rank=0, world=2, base=None)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    files.save_torch(path, {"step": 1, "model": {"w": torch.ones(3)}})

    def dies_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-write
    monkeypatch.setattr(files.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        files.save_torch(path, {"step": 2, "model": {"w": torch.zeros(3)}})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """UniMed.forward returns a NaN loss on its `step`-th call (one call per step: no accumulation)."""
    calls = {"n": 0}
    forward = UniMed.forward

    def nan_at(self, *args, **kwargs):
        loss, weights, tokens = forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == step else loss), weights, tokens
    monkeypatch.setattr(UniMed, "forward", nan_at)


@pytest.mark.parametrize("flags", [[], ["--low-memory"]], ids=["standard", "low-memory"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run, monkeypatch, tmp_path, flags):
    nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit, match=r"loss is nan at step 3 \(task '\w+'"):
        run("--iters", "6", "--save-every", "2", *flags)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_nan_between_log_steps_stops_at_the_next_read_before_a_save(run, monkeypatch, tmp_path):
    nan_loss_at_step(monkeypatch, 5)
    with pytest.raises(SystemExit, match=r"loss is nan at step 5 \(task '\w+'"):
        run("--iters", "12", "--log-every", "10", "--save-every", "3")  # read at step 6, a save step
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("checkpointing", ["--no-grad-checkpointing", "--grad-checkpointing"])
def test_steps_that_neither_log_nor_save_read_nothing_back(run, monkeypatch, checkpointing):
    """A host read (.item(), float(), bool(), tolist) waits for the device: only log and save steps may."""
    counter, at = OpCounter(), {"step": 0}
    step, draw = train.train_step, data.Mixture.draw

    def counted_step(run, micros):
        at["step"] = run.step + 1  # the reads until the next step's are this step's
        return step(run, micros)

    def sampler_draw(self):  # the sampler's CPU tensors are host data on any machine: not counted
        with counter.pause():
            return draw(self)
    monkeypatch.setattr(train, "train_step", counted_step)
    monkeypatch.setattr(data.Mixture, "draw", sampler_draw)
    reads = []
    counter.reads = type("Reads", (list,), {"append": lambda self, name: reads.append((at["step"], name))})()
    with counter:
        run("--iters", "6", "--log-every", "3", "--save-every", "0", checkpointing)
    steps = {s for s, _ in reads if s > 0}  # step 0: setting up
    assert 3 in steps and steps <= {3, 6}, reads


def test_workers_make_the_same_run_and_resume_exactly(run, tmp_path):
    """Images read in 2 DataLoader workers, which run ahead of the step: the same losses and weights as
    reading them in the main process, and the checkpoint holds the sampler of the last step trained."""
    straight, straight_log, _ = run("--iters", "4", "--workers", "0", out="w0.pt")
    workers, workers_log, _ = run("--iters", "4", "--workers", "2", out="w2.pt")
    assert [r["loss"] for r in workers_log] == [r["loss"] for r in straight_log]
    assert_same_weights(straight["model"], workers["model"])
    half, _, path = run("--iters", "4", "--workers", "2", out="resumed.pt", stop_at=2)
    assert half["sampler"]["step"] == 2
    train.main(["--resume", path, "--out", path])
    resumed = torch.load(path, map_location="cpu", weights_only=True)
    assert_same_weights(straight["model"], resumed["model"])
    assert torch.equal(straight["sampler"]["generator"], resumed["sampler"]["generator"])


def test_bad_data_stops_the_run_before_the_weights_are_loaded(demo, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(demo, root)
    monkeypatch.setattr(workshop_demo, "DEMO_EVA", TINY_EVA)
    monkeypatch.chdir(root)
    imgs = root / "demo/data/Slake-VQA/imgs"
    os.remove(imgs / "xmlab0/source.jpg")
    json.dump([{"tumor": [50, 10, 30, 10]}, {"kidney": [1, 1, 5, 5]}], open(imgs / "xmlab2/detection.json", "w"))
    loaded = []
    monkeypatch.setattr(UniMed, "from_pretrained", lambda *a, **k: loaded.append(1))
    with pytest.raises(SystemExit) as stop:
        train.main([*FAST, "--iters", "2", "--out", str(tmp_path / "ckpt.pt")])
    lines = str(stop.value.code).splitlines()
    assert lines[0] == "train.py: the training data has 3 problem(s), found before the first step:"
    assert "xmlab0/source.jpg" in lines[1] and "image not found" in lines[1]
    assert all("xmlab2/detection.json, row 0: box" in line for line in lines[2:4])
    assert lines[-1] == "fix them, or skip this check with --no-check-data"
    assert not loaded and not os.path.exists(tmp_path / "ckpt.pt")


def test_the_check_lists_the_first_20_problems_and_can_be_skipped(run, monkeypatch):
    monkeypatch.setattr(data, "check_datasets", lambda datasets, rank, world: [f"problem {i}" for i in range(25)])
    with pytest.raises(ValueError) as e:
        train.check_data({}, 0, 1)
    lines = str(e.value).splitlines()
    assert lines[1:] == [f"  problem {i}" for i in range(20)] + ["  ... and 5 more", lines[-1]]
    ckpt, _, _ = run("--iters", "1", "--no-check-data")  # the same 25 problems, not looked for
    assert ckpt["step"] == 1


def test_ddp_on_gloo_equals_one_process(run, demo, tmp_path):
    """torchrun with 2 CPU processes x batch 2 == 1 process x batch 2 x grad-accum 2 (same global batch)."""
    flags = [*FAST, "--iters", "3", "--batch-size", "2", "--lr", "3e-3"]
    single, _, _ = run("--iters", "3", "--batch-size", "2", "--lr", "3e-3", "--grad-accum", "2", out="single.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, "tests", "test_train.py"), *flags, "--out", str(tmp_path / "ddp.pt")]
    result = subprocess.run(cmd, cwd=demo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["step"] == 3 and ddp["sampler"]["step"] == single["sampler"]["step"]
    assert_same_weights(single["model"], ddp["model"], atol=1e-6)


TABLE_2 = {
    "(a) linear": ["--connector", "linear"],
    "(a) mlp": ["--connector", "mlp"],
    "(a) constant": ["--router", "constant"],
    "(a) hard": ["--router", "hard"],
    "(a) sparse token": ["--router", "sparse", "--router-input", "token", "--top-k", "2"],
    "(a) soft token": ["--router", "soft", "--router-input", "token"],
    "(a) soft task": ["--router", "soft", "--router-input", "task"],
    "(a) soft token_task": ["--router", "soft", "--router-input", "token_task"],
    "(b) rate 1": ["--resampler", "projection", "--rate", "1"],
    "(b) projection 2": ["--resampler", "projection", "--rate", "2"],
    "(b) maxpool": ["--resampler", "maxpool"],
    "(b) avgpool": ["--resampler", "avgpool"],
    "(b) none": ["--resampler", "none"],
    "(c) 3 experts": ["--experts", "3"],
    "(c) 16 experts": ["--experts", "16"],
    "(d) rank 4": ["--lora-r", "4"],
    "(d) rank 64": ["--lora-r", "64"],
    "(e) LoRA-MoE": ["--connector", "mlp", "--lora-moe"],
    "official schedule": ["--schedule", "official"],
}


@pytest.mark.parametrize("flags", TABLE_2.values(), ids=TABLE_2.keys())
def test_every_table_2_ablation_runs_a_step(run, monkeypatch, flags):
    only(monkeypatch, "slake_rec")  # an image task, so the step goes through the connector
    ckpt, log, _ = run("--iters", "1", *flags)
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert log[0]["task_loss"].keys() == {"refer"}


if __name__ == "__main__":  # a rank of the DDP test, launched by torchrun from the demo directory
    workshop_demo.DEMO_EVA = TINY_EVA
    train.main()
