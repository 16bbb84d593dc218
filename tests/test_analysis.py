"""workshop/analysis.py: the equations on hand-made gradients with known answers, t-SNE on separated clusters,
the figures, the training curves of a log, and the whole analysis on a short demo checkpoint."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from workshop import analysis
import data
from workshop import demo as workshop_demo
from cmoe import Connector, ConnectorConfig
from lora import LoRALinear
from workshop.demo import build_demo, make_demo


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------------
# Eq. 1-5 on hand-made gradients

def conflict(grads: list) -> tuple:
    """GD (Eq. 1-2) and GM (Eq. 3) from per-task batch gradients [n_i, P], the textbook way."""
    units = torch.stack([analysis.unit_mean(g) for g in grads])  # [K, P]
    dots = [analysis.interference(units, g) for g in grads]
    mean_norms = torch.stack([g.norm(dim=1).mean() for g in grads])
    return analysis.gradient_direction(dots), analysis.gradient_magnitude(mean_norms)


def test_identical_gradients_give_gd_and_gm_one():
    g = torch.randn(5, 50, dtype=torch.float64)
    gd, gm = conflict([g, g.clone()])
    assert torch.allclose(gd, torch.ones(2, 2, dtype=torch.float64))
    assert torch.allclose(gm, torch.ones(2, 2, dtype=torch.float64))
    assert torch.allclose(analysis.tug_of_war(gd, gm), torch.full((2,), 2.0, dtype=torch.float64))


def test_opposite_gradients_give_gd_minus_one():
    g = torch.randn(4, 30, dtype=torch.float64)
    gd, gm = conflict([g, -g])
    assert torch.allclose(gd, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(gm, torch.ones(2, 2, dtype=torch.float64))  # same magnitudes
    assert torch.allclose(analysis.tug_of_war(gd, gm), torch.zeros(2, dtype=torch.float64))


def test_ten_times_larger_gradient():
    g = torch.randn(3, 20, dtype=torch.float64)
    gd, gm = conflict([g, 10 * g])
    assert torch.allclose(gm[0, 1], torch.tensor(2 * 10 / (1 + 100), dtype=torch.float64))  # Eq. 3
    assert torch.allclose(gm, gm.T)
    assert torch.allclose(gd, torch.ones(2, 2, dtype=torch.float64))  # Eq. 1 normalises the step: same direction


def test_orthogonal_gradients_do_not_interfere():
    a = torch.zeros(2, 4, dtype=torch.float64)
    a[:, 0] = torch.tensor([1.0, 2.0])
    b = torch.zeros(2, 4, dtype=torch.float64)
    b[:, 1] = torch.tensor([3.0, 1.0])
    gd, _ = conflict([a, b])
    assert torch.allclose(gd, torch.eye(2, dtype=torch.float64))


def test_statistics_score_and_histogram():
    agree = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.1], [0.2, -5.0, 2.0]])  # [T=3, P=3], same signs
    assert torch.allclose(analysis.statistics_score(agree), torch.ones(3))
    cancel = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])
    assert torch.allclose(analysis.statistics_score(cancel), torch.zeros(2))
    half = torch.tensor([[3.0], [-1.0]])  # |3 - 1| / (3 + 1)
    assert torch.allclose(analysis.statistics_score(half), torch.tensor([0.5]))
    scores = torch.tensor([0.0, 0.05, 0.1, 0.55, 0.999, 1.0, float("nan")])
    assert analysis.score_histogram(scores).tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]


def test_group_by_task_matches_pooling_the_batches():
    """A task's GD from its datasets' Eq. 1 columns equals GD computed on the pooled task batches."""
    torch.manual_seed(0)
    grads = {"slake_vqa": torch.randn(3, 12, dtype=torch.float64), "path_vqa": torch.randn(5, 12, dtype=torch.float64),
             "mimic_cxr": torch.randn(4, 12, dtype=torch.float64)}
    names = list(grads)
    units = torch.stack([analysis.unit_mean(g) for g in grads.values()])
    dots = [analysis.interference(units, g) for g in grads.values()]
    norms = [g.norm(dim=1) for g in grads.values()]
    tasks, task_dots, task_norms = analysis.group_by_task(names, dots, norms)
    assert tasks == ["vqa", "caption"]
    pooled = [torch.cat([grads["slake_vqa"], grads["path_vqa"]]), grads["mimic_cxr"]]
    gd, gm = conflict(pooled)
    assert torch.allclose(analysis.gradient_direction(task_dots), gd)
    assert torch.allclose(analysis.gradient_magnitude(task_norms), gm)


# -------------------------------------------------------------------------------------------------
# t-SNE

def test_tsne_separates_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 60))
    x = np.concatenate([c + rng.normal(0, 1, (40, 60)) for c in centres])
    labels = np.repeat(np.arange(3), 40)
    y = analysis.tsne(x, perplexity=15, iters=500, seed=1)
    assert y.shape == (120, 2) and np.isfinite(y).all()
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.97
    # separated: each cluster's spread is small next to the distance between cluster centres
    means = np.stack([y[labels == k].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(y[labels == k] - means[k], axis=1).mean() for k in range(3))
    gap = min(np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a + 1, 3))
    assert gap > 3 * spread


def test_affinities_match_the_perplexity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    p = analysis.affinities(d, perplexity=10)
    assert np.allclose(p.sum(1), 1) and np.allclose(np.diag(p), 0)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    assert np.allclose(np.exp(entropy), 10, rtol=1e-3)


# -------------------------------------------------------------------------------------------------
# Figures from hand-made numbers (no model needed)

def fake_run(label, seed):
    rng = np.random.default_rng(seed)
    names = ["slake_vqa", "path_vqa", "mimic_cxr", "slake_rec", "dermamnist"]
    tasks = ["vqa", "caption", "refer", "cls"]
    n = 40
    return {
        "label": label, "target": "connector",
        "by_dataset": {"labels": names, "gd": rng.uniform(-1, 1, (5, 5)).tolist(),
                       "gm": rng.uniform(0, 1, (5, 5)).tolist()},
        "by_task": {"labels": tasks, "gd": rng.uniform(-1, 1, (4, 4)).tolist(),
                    "gm": rng.uniform(0, 1, (4, 4)).tolist(), "index": rng.uniform(-1, 3, 4).tolist()},
        "statistics_score": {"fraction": (rng.dirichlet(np.ones(10))).tolist()},
        "routing": {"tasks": {t: rng.dirichlet(np.ones(5)).tolist() for t in tasks},
                    "datasets": {d: rng.dirichlet(np.ones(5)).tolist() for d in names}},
        "tsne": {"tasks": [tasks[k % 4] for k in range(n)], "before": rng.normal(size=(n, 2)).tolist(),
                 "after": rng.normal(size=(n, 2)).tolist()},
    }


def check_outputs(out, result):
    names = set(result["figures"])
    assert names == {"fig2_gradient_conflict_datasets.png", "fig2_gradient_conflict_tasks.png",
                     "fig4a_tug_of_war_index.png", "fig4b_statistics_score.png", "fig4c_routing_weights.png",
                     "fig5_tsne.png"}
    for name, size in result["figures"].items():
        with Image.open(os.path.join(out, name)) as img:
            img.verify()  # a complete, valid PNG
        with Image.open(os.path.join(out, name)) as img:
            assert img.format == "PNG" and list(img.size) == size and min(size) > 200
            assert len(img.convert("RGB").getcolors(1 << 24)) > 20  # drawn, not blank
    on_disk = json.load(open(os.path.join(out, "analysis.json")))
    assert on_disk["figures"] == result["figures"]
    assert not os.path.exists(os.path.join(out, "analysis.json.tmp"))


def test_report_draws_every_figure_for_two_runs(tmp_path):
    runs = [fake_run("MLP", 0), fake_run("CMoE", 1)]
    result = analysis.report(runs, str(tmp_path))
    check_outputs(str(tmp_path), result)
    # Section 4.3: one maximum over both runs
    values = [v for r in result["runs"] for v in r["index_normalised"].values()]
    assert max(abs(v) for v in values) == pytest.approx(1.0)
    # an earlier analysis.json is read back as a baseline and drawn again
    again = analysis.report(analysis.load_runs(str(tmp_path / "analysis.json")), str(tmp_path / "again"))
    assert again["figures"] == result["figures"]


# -------------------------------------------------------------------------------------------------
# The streamed two-pass gradients against the textbook computation, on a toy model with a real Connector

class Toy(torch.nn.Module):
    """The part of the UniMed interface analysis.py uses, around a real (tiny) Connector-MoE: ViT
    features from a fixed random patch projection, a loss pulling the embeddings toward a code of
    the answer text."""
    image_size = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Linear(48, 12).requires_grad_(False)  # 4x4 patches of a 16x16 image
        self.connector = Connector(ConnectorConfig(vit_width=12, llm_width=8, experts=3, router_hidden=16))
        self.head = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=4, dropout=0.1)  # stands in for the LLM
        torch.nn.init.normal_(self.head.lora_B.weight)

    def autocast(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def vision_features(self, images):
        B = len(images)
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(B, 16, 48)
        return self.patch(patches)  # [B, 16, 12]

    def forward(self, images, instructions, answers, task):
        code = lambda texts: torch.tensor([[float(ord(c) % 7) for c in (s + " " * 8)[:8]] for s in texts])
        if images is None:  # text-only QA
            x, weights = code(instructions), None
        else:
            embeds, weights = self.connector(self.vision_features(images), task)  # [B, 4, 8]
            x = embeds.mean(1)
        return ((self.head(x) - code(answers)) ** 2).mean(), weights, len(answers)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("analysis_data"))
    make_demo(root)
    return data.load_datasets(root, "train", names=["medqa", "slake_vqa", "path_vqa", "mimic_cxr",
                                                    "slake_rec", "slake_reg", "dermamnist"], train=False)


def test_streamed_gradients_match_the_textbook(demo_data):
    model = Toy()
    config = analysis.AnalysisConfig(batches=3, batch_size=2, seed=5)
    names = ["slake_vqa", "path_vqa", "mimic_cxr", "slake_rec", "dermamnist"]
    stats = analysis.gradient_statistics(model, demo_data, names, config)
    params = analysis.target_parameters(model, "connector")
    grads = {}
    with analysis.gradients_for(model, params):
        for n in names:
            plans = analysis.sample_batches(demo_data[n], 3, 2, seed=5)
            grads[n] = torch.stack([torch.cat([g.flatten() for g in analysis.batch_gradient(
                model, params, demo_data[n], plan)[0]]) for plan in plans]).double()  # [3, P]
    units = torch.stack([analysis.unit_mean(grads[n]) for n in names])
    for n in names:
        want = analysis.interference(units, grads[n])
        got = torch.tensor(stats["dots"][n], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max())  # bf16 storage
        assert torch.allclose(torch.tensor(stats["norms"][n], dtype=torch.float64), grads[n].norm(dim=1), rtol=1e-5)
    tasks = ["vqa", "refer", "caption", "cls"]  # analysis.TASKS order
    task_means = torch.stack([torch.cat([grads[n] for n in names if data.TASK_OF[n] == t]).mean(0) for t in tasks])
    want = analysis.score_histogram(analysis.statistics_score(task_means))
    got = torch.tensor(stats["score_counts"])
    assert got.sum() == want.sum() and (got - want).abs().sum() <= 0.02 * want.sum()
    assert stats["score_tasks"] == tasks
    for n in names:
        assert len(stats["routing"][n]) == 3 and sum(stats["routing"][n]) == pytest.approx(1, abs=1e-5)
    assert all(p.requires_grad for _, p in params)  # restored


def test_lora_target_includes_text_only_qa(demo_data):
    model = Toy()
    subset = {n: demo_data[n] for n in ("medqa", "slake_vqa", "mimic_cxr")}
    r = analysis.analyse(model, subset, analysis.AnalysisConfig(batches=2, batch_size=2, samples_per_task=4,
                                                                target="lora", tsne_iters=50))
    assert r["parameters"] == 2 * 8 + 8 * 2  # lora_A and lora_B of the head
    assert r["by_task"]["labels"] == ["vqa", "caption", "qa"]
    assert set(r["routing"]["datasets"]) == {"slake_vqa", "mimic_cxr"}  # QA has no connector routing
    assert model.head.dropout.training and model.training  # the analysis switched dropout off, then back


def test_run_writes_every_file(demo_data, tmp_path, capsys):
    config = analysis.AnalysisConfig(batches=2, batch_size=2, samples_per_task=8, tsne_iters=300)
    result = analysis.run(Toy(), demo_data, str(tmp_path), config, label="toy")
    check_outputs(str(tmp_path), result)
    assert "medqa skipped" in capsys.readouterr().err  # text-only QA never reaches the connector
    r = result["runs"][0]
    assert r["by_task"]["labels"] == ["vqa", "refer", "identify", "caption", "cls"]
    assert np.allclose(np.diag(np.array(r["by_dataset"]["gd"])), 1)
    assert len(r["tsne"]["before"]) == len(r["tsne"]["after"]) == len(r["tsne"]["tasks"]) == 5 * 8
    vqa = [d for d, t in zip(r["tsne"]["datasets"], r["tsne"]["tasks"]) if t == "vqa"]
    assert vqa.count("slake_vqa") == vqa.count("path_vqa") == 4  # a task's datasets take turns


# -------------------------------------------------------------------------------------------------
# The whole analysis on a short demo checkpoint

@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A tiny demo (as tests/test_train.py builds it) trained for a few steps -> (root, ckpt path)."""
    if not hasattr(__import__("model"), "UniMed"):
        pytest.skip("model.UniMed is not written yet")
    import train
    from vision import EVAConfig
    root = tmp_path_factory.mktemp("analysis_demo")
    tiny_llama = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, vocab_size=400, max_seq_len=512)
    tiny_eva = EVAConfig(img_size=28, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workshop_demo, "DEMO_LLAMA", tiny_llama)
        mp.setattr(workshop_demo, "DEMO_EVA", tiny_eva)
        mp.chdir(root)
        build_demo(pretrain=dict(steps=10, batch=8, block=64, lr=3e-3))
        train.main(["--router-hidden", "32", "--device", "cpu", "--save-every", "0", "--iters", "3",
                    "--out", "ckpt.pt"])
    return root, str(root / "ckpt.pt")


def test_analysis_command_on_demo_checkpoint(demo_checkpoint, tmp_path, monkeypatch):
    root, ckpt = demo_checkpoint
    monkeypatch.chdir(root)
    out = str(tmp_path / "out")
    analysis.main([ckpt, "--out", out, "--batches", "2", "--samples-per-task", "6", "--device", "cpu",
                   "--labels", "demo"])
    result = json.load(open(os.path.join(out, "analysis.json")))
    check_outputs(out, result)
    r = result["runs"][0]
    k = len(r["by_dataset"]["labels"])
    assert k >= 5 and all(len(v) == 2 for v in (d["grad_norms"] for d in r["datasets"].values()))
    gd = np.array(r["by_dataset"]["gd"], dtype=float)
    assert gd.shape == (k, k) and np.allclose(np.diag(gd), 1)
    assert sum(r["statistics_score"]["counts"]) + r["statistics_score"]["no_gradient"] == r["parameters"]
    for weights in r["routing"]["tasks"].values():
        assert sum(weights) == pytest.approx(1, abs=1e-5)
    assert len(r["tsne"]["after"]) == len(r["tsne"]["tasks"]) > 6


def test_analysis_command_compares_two_checkpoints(demo_checkpoint, tmp_path, monkeypatch):
    """The README's command: `python -m workshop.analysis A.pt B.pt --out OUT` draws both runs."""
    root, ckpt = demo_checkpoint
    monkeypatch.chdir(root)
    out = str(tmp_path / "out")
    analysis.main([ckpt, ckpt, "--out", out, "--batches", "1", "--device", "cpu"])
    result = json.load(open(os.path.join(out, "analysis.json")))
    check_outputs(out, result)
    assert len(result["runs"]) == 2
    assert result["runs"][0]["by_dataset"]["gd"] == result["runs"][1]["by_dataset"]["gd"]
