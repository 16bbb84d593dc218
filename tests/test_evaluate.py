"""evaluate.py: results for every dataset, exact resume, box post-processing, clear errors, and
official checkpoints written as the official runner writes them (a module with the official double
registration of the experts, peft's real parameter names, the runner's save filter) giving identical
logits, and the official evaluation prompt by default for them.

Everything runs on a tiny UniMed over the demo's base weights (built once per module, without the
LLaMA pre-training), with a checkpoint written directly; the slow test evaluates a short demo run.
"""
import json
import re
from dataclasses import asdict

import pytest
import torch
from PIL import Image

import data
import evaluate
import metrics
from workshop import score
import train
from cmoe import ConnectorConfig
from lib.checkpoint import FORMAT, read_checkpoint
import model as model_module
from model import UniMed, UniMedConfig
from workshop.demo import DEMO_CLAIMS, DEMO_EVA, DEMO_PRETRAIN, build_demo, demo_paths

EXPECTED_KEYS = {  # the paper's columns (and the official scripts' extra figures) for each task
    "vqa": {"bleu1", "bleu2", "bleu3", "bleu4", "f1", "closed_acc",
            *(f"{s}_{k}" for s in ("open", "closed") for k in ("bleu1", "bleu2", "bleu3", "bleu4", "f1"))},
    "identify": {"bleu1", "bleu2", "bleu3", "bleu4", "f1", "acc"},
    "qa": {"bleu1", "bleu2", "bleu3", "bleu4", "f1", "acc"},
    "refer": {"iou", "r@0.5"},
    "caption": {"bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "f1", "scored"},
    "cls": {"acc"},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(llama_dir, vit_path, data_root) of the demo, without pre-training the tiny LLaMA (speed)."""
    root = str(tmp_path_factory.mktemp("demo"))
    build_demo(root, pretrain={**DEMO_PRETRAIN, "steps": 0})
    return demo_paths(root)


def tiny_model(demo, connector: ConnectorConfig, seed: int = 0) -> UniMed:
    """A UniMed on the demo base weights whose trainable weights are all random (LoRA B included,
    so every trainable tensor changes the output)."""
    llama_dir, vit_path, _ = demo
    torch.manual_seed(seed)
    model = UniMed.from_pretrained(llama_dir, vit_path, UniMedConfig(connector=connector),
                                   vit_config=DEMO_EVA, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    return model.eval()


def write_ours(path, model: UniMed, demo) -> str:
    llama_dir, vit_path, data_root = demo
    config = {"unimed": model.config.to_dict(), "vit": asdict(DEMO_EVA), "llama_dir": llama_dir,
              "vit_path": vit_path, "data_root": data_root, "demo": True, "args": {}}
    torch.save({"format": FORMAT, "step": 0, "config": config, "model": model.trainable_state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    model = tiny_model(demo, ConnectorConfig(experts=3))
    return write_ours(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model, demo), model


@pytest.fixture(autouse=True)
def short_answers(monkeypatch):
    """8 new tokens instead of the official 100: random weights never emit eos, and the code path
    is the same (the slow test keeps 100)."""
    monkeypatch.setattr(evaluate, "MAX_NEW_TOKENS", 8)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# -------------------------------------------------------------------------------------------------
# results.json, and the official scripts' figures recomputed from the predictions files

def test_results_have_every_dataset_and_metric(checkpoint, tmp_path):
    path, model = checkpoint
    results = evaluate.evaluate(path, limit=3, batch_size=3, out=str(tmp_path), model=model)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["datasets"] == json.loads(json.dumps(results["datasets"]))
    assert set(on_disk["datasets"]) == set(data.DATASETS)
    assert "paper" not in on_disk  # the demo is not comparable with the paper
    for name, entry in on_disk["datasets"].items():
        task = data.TASK_OF[name]
        assert entry["task"] == task and entry["n"] == 3
        assert set(entry["metrics"]) == EXPECTED_KEYS[task], name
        rows = read_jsonl(tmp_path / f"predictions_{name}.jsonl")
        assert len(rows) == 3 and all({"id", "prompt", "prediction", "reference", "scores"} <= set(r) for r in rows)
        # metrics.py's command line, reading the predictions file back, gives the table's figures
        theirs = metrics.score_dataset(task, score.read_records(str(tmp_path / f"predictions_{name}.jsonl"))[task])
        assert theirs == pytest.approx(entry["metrics"], abs=1e-9), name
    table = evaluate.format_tables(on_disk["datasets"], paper=False)
    assert "Slake-VQA" in table and "SA-Med2D-REC" in table and "Uni-Med (paper)" not in table


# -------------------------------------------------------------------------------------------------
# Resume: an interrupted run, a torn last line, then the rest, equals one uninterrupted run

def test_resumed_evaluation_equals_uninterrupted(checkpoint, tmp_path, monkeypatch):
    path, model = checkpoint
    kwargs = dict(names=["slake_vqa", "slake_rec"], limit=5, batch_size=2, model=model)
    straight = evaluate.evaluate(path, out=str(tmp_path / "a"), **kwargs)

    calls = {"n": 0}
    generate = UniMed.generate

    def interrupted(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd batch: slake_vqa's last one
            raise KeyboardInterrupt
        return generate(self, *args, **kw)

    monkeypatch.setattr(UniMed, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(path, out=str(tmp_path / "b"), **kwargs)
    vqa = tmp_path / "b" / "predictions_slake_vqa.jsonl"
    assert len(read_jsonl(vqa)) == 4  # two whole batches survived
    with open(vqa, "a") as f:
        f.write('{"id": "torn", "prediction": "le')  # a kill in the middle of a write
    calls["n"] = 10  # no more interruptions; count the batches the resumed run generates
    resumed = evaluate.evaluate(path, out=str(tmp_path / "b"), **kwargs)
    assert calls["n"] == 10 + 1 + 3  # slake_vqa's missing batch, then all of slake_rec
    assert resumed["datasets"] == straight["datasets"]
    for name in kwargs["names"]:
        a = read_jsonl(tmp_path / "a" / f"predictions_{name}.jsonl")
        b = read_jsonl(tmp_path / "b" / f"predictions_{name}.jsonl")
        assert a == b


# -------------------------------------------------------------------------------------------------
# REC post-processing on hand-written model outputs (eval_ref.py's rules)

class Scripted(torch.nn.Module):
    """A stand-in model that 'generates' fixed answers, to drive the real post-processing path."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.image_size, self.anchor = outputs, 56, torch.nn.Parameter(torch.zeros(1))

    def generate(self, images, instructions, task, max_new_tokens, compile=False, official_prompt=False):
        return self.outputs[:len(instructions)]


def test_box_postprocessing_on_hand_written_outputs():
    W, H = 200, 100
    gt = (20, 10, 80, 40)  # x, y, w, h -> pixels (20, 10)-(100, 50): grid <10><10><50><50>
    cases = [  # (model output, IoU by the official +1-pixel formula, worked out by hand)
        ("{<10><10><50><50>}", 1.0),  # exact
        ("{ <10> <10><unk> <50> <50> }", 1.0),  # spaces and <unk> are removed first
        ("{<10><10><UNK><50><50>}", 0.0),  # ... without lower-casing first: <UNK> stays (eval_ref.py)
        ("{<10><10><50><50>} is the tumor", 1.0),  # text after the box is ignored
        ("the tumor is at {<10><10><50><50>}", 0.0),  # must start with the box
        ("{<10><10><50>}", 0.0),  # three numbers
        ("<10><10><50><50>", 0.0),  # no braces
        ("{<10><10><50><50>", 0.0),  # unclosed
        ("{<1000><10><50><50>}", 0.0),  # four digits
        ("", 0.0),  # nothing
        ("{<10><10><150><50>}", 81 / 281),  # out of range: scaled to x2 = 300 px, not clipped
        ("{<0><0><25><30>}", 31 * 21 / (51 * 31 + 81 * 41 - 31 * 21)),  # partial overlap
    ]
    samples = [data.Sample(f"s{i}", "slake_rec", "refer", Image.new("RGB", (W, H)),
                           "[refer] give me the location of tumor", "{<10><10><50><50>}", gt, (W, H))
               for i in range(len(cases))]
    records = evaluate.generate_batch(Scripted([c[0] for c in cases]), samples)
    for (output, want), r in zip(cases, records):
        assert r["scores"]["iou"] == pytest.approx(want, abs=1e-12), output
        assert r["scores"]["hit"] == (want > 0.5)
    scores = metrics.score_dataset("refer", json.loads(json.dumps(records)))  # as read back from disk
    assert scores["iou"] == pytest.approx(100 * sum(c[1] for c in cases) / len(cases))
    assert scores["r@0.5"] == pytest.approx(100 * 3 / len(cases))


def test_text_postprocessing_is_the_official_one():
    samples = [data.Sample("q", "slake_vqa", "vqa", Image.new("RGB", (8, 8)), "[vqa] q", "Left Lung",
                           answer_type="CLOSED")]
    r = evaluate.generate_batch(Scripted(["  The <unk>LEFT lung <unk> "]), samples)[0]
    assert r["prediction"] == "the left lung"
    assert r["scores"]["contains"] == 1.0  # normalised reference is a substring of the prediction


# -------------------------------------------------------------------------------------------------
# Clear errors

def test_corrupted_and_foreign_checkpoints_give_clear_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    raw = open(path, "rb").read()
    (tmp_path / "torn.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"torn\.pt: cannot be read"):
        read_checkpoint(str(tmp_path / "torn.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot be read"):
        read_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a Uni-Med checkpoint.*'model'"):
        read_checkpoint(str(tmp_path / "other.pt"))
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["unimed"]
    torch.save(ckpt, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match=r"noconfig\.pt: .*config\.unimed"):
        read_checkpoint(str(tmp_path / "noconfig.pt"))
    with pytest.raises(SystemExit, match=r"error: .*torn\.pt"):  # the command line says it in one line
        evaluate.main([str(tmp_path / "torn.pt")])


def test_config_not_matching_base_weights_names_tensor_and_shapes(checkpoint, tmp_path):
    path, _ = checkpoint
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k in ckpt["model"] if k.endswith("lora_A.weight"))
    want = list(ckpt["model"][name].shape)
    ckpt["model"][name] = torch.zeros(want[0], want[1] + 8)  # as if trained on a wider LLaMA
    torch.save(ckpt, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=re.escape(f"'{name}' has shape [{want[0]}, {want[1] + 8}]")
                       + r".*" + re.escape(str(want))):
        UniMed.from_checkpoint(str(tmp_path / "wide.pt"), device="cpu")


def test_missing_datasets_name_the_expected_path(checkpoint, tmp_path):
    path, model = checkpoint
    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        evaluate.evaluate(path, data_root=str(empty), out=str(tmp_path / "o"), model=model)
    with pytest.raises(FileNotFoundError, match=r"slake_vqa.*" + re.escape(str(empty))):
        evaluate.evaluate(path, data_root=str(empty), names=["slake_vqa"], out=str(tmp_path / "o"), model=model)


# -------------------------------------------------------------------------------------------------
# Official checkpoints (checkpoint_N.pth of MSIIP/Uni-Med)

def peft_lora_names(n_layers: int) -> set:
    """The trainable names peft gives an all-linear LoRA on HF's LlamaForCausalLM, as the official
    UniMed holds it (`self.llm_model = get_peft_model(...)`), so our mapping is checked against them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, num_hidden_layers=n_layers))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=2, lora_alpha=4))
    return {f"llm_model.{n}" for n, p in peft_model.named_parameters() if p.requires_grad}


def to_official(ours: dict) -> dict:
    """Our trainable tensors under the official names, written out by hand (the inverse mapping)."""
    out = {}
    for name, t in ours.items():
        if m := re.fullmatch(r"llama\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])\.weight", name):
            block = "self_attn" if m.group(2) == "attn" else "mlp"
            out[f"llm_model.base_model.model.model.layers.{m.group(1)}.{block}.{m.group(3)}"
                f".lora_{m.group(4)}.default.weight"] = t
        elif m := re.fullmatch(r"connector\.experts\.(\d+)\.fc([12])\.(weight|bias)", name):
            out[f"llm_proj.{m.group(1)}.{0 if m.group(2) == '1' else 2}.{m.group(3)}"] = t
        elif m := re.fullmatch(r"connector\.(task_tokens\.\w+|router\.fc[12]\.(weight|bias))", name):
            out[m.group(1)] = t
        else:
            raise AssertionError(f"no official name for {name}")
    return out


def official_config(router: str, experts: int) -> dict:
    """The run config the runner saves (`self.config.to_dict()`: a plain dict)."""
    return {"model": {"arch": "uni_med", "image_size": 56, "resample_rate": 4, "resample_method": "projection",
                      "has_moe": True, "projector_type": "moe_mlp", "num_experts": experts,
                      "router_method": "router_task_token", "num_task_tokens": 1, "task_token_c": 384,
                      "router_type": router, "llm_model_name": "llama2", "lora_target_modules": ["all"],
                      "lora_r": 8, "lora_alpha": 16, "chat_template": True, "end_sym": "</s>"},
            "run": {"seed": 42, "amp": True}}


class Rotary4_30(torch.nn.Module):
    """transformers 4.30's per-layer LlamaRotaryEmbedding: inv_freq is a persistent buffer, so
    state_dict() lists it (later versions keep it out)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))


class OfficialUniMed(torch.nn.Module):
    """The official UniMed's module tree, as far as its checkpoint can tell (uni_med/models/uni_med.py),
    in its registration order: the LLaMA wrapped by peft (all-linear LoRA, base frozen), the frozen
    ViT and ln_vision, task tokens, the experts in `moe_layers`, the router (always built, as the
    official test `router_type == 'soft' or 'sparse'` is always true), and `llm_proj = moe_layers`."""

    def __init__(self, llama_dir: str, experts: int, width: int, hidden: int):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
        hf_config = HFLlamaConfig.from_pretrained(llama_dir)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        self.llm_model = get_peft_model(LlamaForCausalLM(hf_config), LoraConfig(
            task_type="CAUSAL_LM", target_modules=targets, r=8, lora_alpha=16, lora_dropout=0.05))
        for layer in self.llm_model.base_model.model.model.layers:
            layer.self_attn.rotary_emb = Rotary4_30(hf_config.hidden_size // hf_config.num_attention_heads)
        self.visual_encoder = torch.nn.Linear(8, 8).requires_grad_(False)  # stands in: frozen, so not saved
        self.ln_vision = torch.nn.LayerNorm(8).requires_grad_(False)
        self.task_tokens = torch.nn.ParameterDict({t: torch.nn.Parameter(torch.randn(1, 1, width))
                                                   for t in ("vqa", "refer", "identify", "caption", "cls")})
        self.moe_layers = torch.nn.ModuleDict({str(k): torch.nn.ModuleList([
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]) for k in range(experts)})
        self.router = torch.nn.Module()
        self.router.fc1, self.router.fc2 = torch.nn.Linear(2 * width, 8 * width), torch.nn.Linear(8 * width, experts)
        self.llm_proj = self.moe_layers  # the official double registration

    def load_trained(self, official: dict) -> None:
        """Set the trained tensors (official names, experts as llm_proj.*); every one must land."""
        result = self.load_state_dict(official, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert set(official) <= set(self.state_dict())


def runner_save(model: torch.nn.Module, path, config: dict, epoch: int) -> dict:
    """What the official runner's `_save_checkpoint` (LAVIS runner_base.py) writes: state_dict() less
    the keys that named_parameters() names and that do not require grad, beside the optimizer, the
    config, the scaler and the epoch. Returns the saved "model" entry."""
    param_grad = {k: v.requires_grad for k, v in model.named_parameters()}
    state = model.state_dict()
    for k in list(state):
        if k in param_grad and not param_grad[k]:
            del state[k]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.0)  # one step of lr 0: optimizer state, weights unchanged
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}  # torch.cuda.amp.GradScaler.state_dict()
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": config, "scaler": scaler,
                "epoch": epoch}, path)
    return state


def official_model_from(source: UniMed, llama_dir: str, experts: int) -> OfficialUniMed:
    fc1 = source.connector.experts[0].fc1.weight
    official = OfficialUniMed(llama_dir, experts, width=fc1.shape[1], hidden=fc1.shape[0])
    official.load_trained(to_official(source.trainable_state_dict()))
    return official


def logits_of(model: UniMed, images, instructions, answers, task):
    """The LLaMA's logits [B, T, V] on a teacher-forced batch, the image embeddings and routing weights."""
    with torch.no_grad():
        embeds, _, weights, _ = model.training_inputs(images, instructions, answers, task)
        return model.llama(inputs_embeds=embeds), embeds, weights


def assert_same_model(source: UniMed, loaded: UniMed, data_root: str, name: str):
    batch = data.collate([data.load_datasets(data_root, "test", names=[name])[name][i] for i in range(3)],
                         image_size=source.image_size)
    args = (batch.images, batch.instructions, batch.answers, batch.task)
    for a, b in zip(logits_of(source, *args), logits_of(loaded, *args)):
        assert torch.equal(a, b)


@pytest.fixture
def official_vit_is_the_demos(monkeypatch):
    """An official checkpoint was trained on EVA ViT-G (model.EVAConfig at its image size); the demo's
    tiny EVA stands in for it here."""
    monkeypatch.setattr(model_module, "EVAConfig", lambda img_size=224: DEMO_EVA)


def test_official_checkpoint_as_the_runner_writes_it(demo, official_vit_is_the_demos, tmp_path, capsys):
    llama_dir, vit_path, data_root = demo
    source = tiny_model(demo, ConnectorConfig(experts=5, router="soft"), seed=1)
    n_layers = len(source.llama.layers)
    ours = source.trainable_state_dict()
    assert {k for k in to_official(ours) if k.startswith("llm_model.")} == peft_lora_names(n_layers)
    official = official_model_from(source, llama_dir, experts=5)
    ckpt_path = str(tmp_path / "checkpoint_3.pth")
    saved = runner_save(official, ckpt_path, official_config("soft", 5), epoch=3)
    # what the runner's filter lets through: both names of every expert tensor, one buffer per layer
    aliases = [k for k in saved if k.startswith("moe_layers.")]
    buffers = [k for k in saved if k.endswith("rotary_emb.inv_freq")]
    assert len(aliases) == 5 * 4 and all(k.replace("moe_layers.", "llm_proj.", 1) in saved for k in aliases)
    assert len(buffers) == n_layers
    assert len(saved) == len(ours) + len(aliases) + len(buffers)

    loaded = UniMed.from_checkpoint(ckpt_path, llama_dir, vit_path, "cpu")
    out = capsys.readouterr().out
    assert (f"kept {len(ours)} tensors; dropped {len(aliases)} aliases (moe_layers.* = llm_proj.*), "
            f"{n_layers} frozen buffers (rotary_emb.inv_freq), 0 tensors the official model never uses") in out
    assert_same_model(source, loaded, data_root, "slake_vqa")

    # one copy of an expert only (the other name absent): still that expert
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("llm_proj.")}
    torch.save(ckpt, tmp_path / "checkpoint_4.pth")
    assert_same_model(source, UniMed.from_checkpoint(str(tmp_path / "checkpoint_4.pth"), llama_dir, vit_path, "cpu"), data_root, "slake_vqa")


def test_official_checkpoint_whose_aliases_differ_names_both(demo, official_vit_is_the_demos, tmp_path):
    llama_dir, vit_path, _ = demo
    source = tiny_model(demo, ConnectorConfig(experts=5, router="soft"), seed=1)
    runner_save(official_model_from(source, llama_dir, experts=5), tmp_path / "checkpoint_3.pth",
                official_config("soft", 5), epoch=3)
    ckpt = torch.load(tmp_path / "checkpoint_3.pth", weights_only=True)
    ckpt["model"]["moe_layers.2.0.bias"] = ckpt["model"]["moe_layers.2.0.bias"] + 1  # no longer one tensor
    torch.save(ckpt, tmp_path / "checkpoint_bad.pth")
    with pytest.raises(ValueError, match=r"checkpoint_bad\.pth: 'moe_layers\.2\.0\.bias' and 'llm_proj\.2\.0\.bias' differ"):
        UniMed.from_checkpoint(str(tmp_path / "checkpoint_bad.pth"), llama_dir, vit_path, "cpu")


def test_official_hard_router_checkpoint_drops_the_unused_router(demo, official_vit_is_the_demos, tmp_path, capsys):
    llama_dir, vit_path, data_root = demo
    source = tiny_model(demo, ConnectorConfig(experts=5, router="hard"), seed=2)
    assert not any(k.startswith(("connector.router.", "connector.task_tokens.")) for k in source.trainable_state_dict())
    # the official model also builds (and saves) a router and task tokens it never uses
    ckpt_path = str(tmp_path / "checkpoint_0.pth")
    runner_save(official_model_from(source, llama_dir, experts=5), ckpt_path, official_config("hard", 5), epoch=0)
    loaded = UniMed.from_checkpoint(ckpt_path, llama_dir, vit_path, "cpu")
    assert "9 tensors the official model never uses (router, task_tokens)" in capsys.readouterr().out
    assert_same_model(source, loaded, data_root, "slake_rec")


def test_official_checkpoints_get_the_official_prompt_by_default(demo, tmp_path, capsys, monkeypatch):
    """evaluate.py prompts an official checkpoint with two BOS and ours with one, unless told."""
    _, _, data_root = demo
    source = tiny_model(demo, ConnectorConfig(experts=5, router="soft"), seed=1)
    torch.save({"model": to_official(source.trainable_state_dict()), "config": official_config("soft", 5),
                "epoch": 3}, tmp_path / "checkpoint_3.pth")  # the model itself is passed in below
    ours = write_ours(tmp_path / "ckpt.pt", source, demo)
    seen = []
    generate = UniMed.generate

    def spy(self, *args, official_prompt=False, **kw):
        seen.append(official_prompt)
        return generate(self, *args, official_prompt=official_prompt, **kw)

    monkeypatch.setattr(UniMed, "generate", spy)
    kwargs = dict(data_root=data_root, names=["slake_vqa"], limit=1, batch_size=1, model=source)
    runs = [(str(tmp_path / "checkpoint_3.pth"), None, True), (ours, None, False), (ours, True, True),
            (str(tmp_path / "checkpoint_3.pth"), False, False)]
    for i, (path, flag, want) in enumerate(runs):
        seen.clear()
        results = evaluate.evaluate(path, out=str(tmp_path / f"out{i}"), official_prompt=flag, **kwargs)
        assert seen == [want] and results["official_prompt"] is want
        said = "prompt: the official evaluation prompt, two BOS" if want else "prompt: one BOS, as in training"
        assert said in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"out0/predictions_slake_vqa.jsonl was generated with the other prompt: "
                                         r"resume with --official-prompt"):  # a resumed run must not mix them
        evaluate.evaluate(ours, out=str(tmp_path / "out0"), **kwargs)


# -------------------------------------------------------------------------------------------------
# The real thing, shortened: a demo training run, then `python evaluate.py ckpt.pt`

@pytest.mark.slow
def test_full_demo_scores_above_chance(tmp_path, monkeypatch):
    """README command 1 as it runs (the default seed, the demo's 5000 steps, ~9 min on 2 cores), then the
    evaluation: every dataset beats its chance level by the margin the README claims
    (demo.DEMO_CLAIMS), the least lead over chance of the 10 seeds of docs/demo.md's table."""
    monkeypatch.setattr(evaluate, "MAX_NEW_TOKENS", 100)  # the official length, not short_answers' 8
    monkeypatch.chdir(tmp_path)
    train.main([])
    evaluate.main(["ckpt.pt"])
    results = json.load(open(tmp_path / "eval_ckpt" / "results.json"))["datasets"]
    assert set(results) == set(data.DATASETS) == set(DEMO_CLAIMS)
    short = {name: results[name]["metrics"][metric] for name, (metric, chance, margin, _) in DEMO_CLAIMS.items()
             if not results[name]["metrics"][metric] > chance + margin}
    assert not short, short
