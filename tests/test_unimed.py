"""The assembled Uni-Med: full-size shapes and counts on `meta`, the shape trace (workshop/shapes.py) against
README.md's diagram, label masking, which weights learn, every ablation switch, and a tiny model that
overfits image-text pairs of two tasks."""
import itertools
import os
import re

import pytest
import sentencepiece as spm
import torch

from cmoe import ConnectorConfig
from model import Llama, LlamaConfig, Tokenizer, UniMed, UniMedConfig, build_prompt
from workshop.shapes import TRACE, TRACE_BATCH, parameter_summary, trace
from vision import EVAConfig, EVAViT

WORDS = ("left right upper lower lung liver kidney heart bright dark round square opacity lesion "
         "where is the which side what shape colour red green blue yes no describe image").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def word_tokenizer(d) -> Tokenizer:
    """A sentencepiece tokenizer of WORDS and the prompt's pieces, written under directory `d`."""
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    lines += ["[INST] <Img><ImageHere></Img> [vqa] [refer] [cls] [caption] [identify] [qa] [/INST] {<12><34>}"]
    (d / "text.txt").write_text("\n".join(lines * 4))
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    return Tokenizer(str(d / "tokenizer.model"))


def tiny_unimed(tokenizer, seed=0, **switches) -> UniMed:
    torch.manual_seed(seed)
    llama = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                              vocab_size=tokenizer.vocab_size, max_seq_len=256)).eval()
    # nn.Linear's default init gives logits too small to ever be confident over 400 tokens through a
    # frozen head; a trained LM's head is larger, so give the frozen random head that scale.
    torch.nn.init.normal_(llama.lm_head.weight, std=0.5)
    vit = EVAViT(EVAConfig(img_size=56, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64)).eval()
    lora = {k: switches.pop(k) for k in list(switches) if k.startswith("lora_")}
    config = UniMedConfig(connector=ConnectorConfig(**switches), **lora)
    return UniMed(config, llama, vit, tokenizer)


def test_full_size_on_meta_matches_the_spec():
    with torch.device("meta"):
        model = UniMed(UniMedConfig(), Llama(LlamaConfig()), EVAViT(EVAConfig()), tokenizer=None)
        images = torch.empty(2, 3, 224, 224)
        features = model.vit(images)
        embeds, weights = model.connector(features[:, 1:], "vqa")
    assert features.shape == (2, 257, 1408)
    assert embeds.shape == (2, 64, 4096) and weights.shape == (2, 64, 5)
    counts = parameter_summary(model)
    assert counts["connector experts"] == (199_270_400, 0)
    assert counts["router"] == (507_781_125, 0)
    assert counts["task tokens"] == (28_160, 0)
    assert counts["LoRA"] == (19_988_480, 0)
    assert counts["LLaMA base"] == (0, 6_738_415_616)
    assert counts["EVA ViT"] == (0, 985_894_528)


SHAPE = re.compile(r"\[(?:[BT]|\d+)(?:, (?:[BT]|\d+))*\]|\[\]")  # [B, 64, 5632], [B, T, 4096], []


def test_readme_diagram_lists_the_shapes_of_the_trace():
    rows = trace()  # full size on meta, words as tokens: no files needed
    assert len(rows) == len(TRACE) - 1 + 5  # every stage, the expert row once per expert
    assert all(r["size"][0] == len(TRACE_BATCH) for r in rows[:-1]) and rows[-1]["size"] == []
    assert {"Eq. 6", "Eq. 7", "Eq. 8", "Eq. 8, 14", "Eq. 9"} <= {r["eq"] for r in rows}
    shapes = [r["shape"] for r in rows]
    flow = [s for i, s in enumerate(shapes) if i == 0 or s != shapes[i - 1]]  # repeats in a row: one line
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    diagram = re.search(r"```\n(.*?)```", readme, re.S).group(1)  # the first fenced block
    assert SHAPE.findall(diagram) == flow


def test_trace_follows_the_config_and_counts_real_tokens(tokenizer):
    config = UniMedConfig(connector=ConnectorConfig(resampler="avgpool", experts=3))
    rows = {r["stage"]: r for r in trace(config, tokenizer=tokenizer)}
    assert rows["resampler: f_ag (the experts' input)"]["shape"] == "[B, 64, 1408]"
    assert rows["router weights w"]["shape"] == "[B, 64, 3]"
    assert [s for s in rows if s.startswith("expert E")] == [f"expert E{k}(f_ag)" for k in (1, 2, 3)]
    lengths = []  # <s>, the text on each side of the 64 image embeddings, the answer and </s>
    for instruction, answer in TRACE_BATCH:
        before, after = build_prompt(instruction, True, train=True).split("<ImageHere>")
        lengths.append(1 + len(tokenizer.encode(before, bos=False)) + 64 + len(tokenizer.encode(after, bos=False))
                       + len(tokenizer.encode(answer, bos=False, eos=True)))
    assert rows["logits"]["size"] == [len(TRACE_BATCH), max(lengths), 32000]


def test_prompts_follow_the_official_format():
    assert build_prompt("[vqa] where?", has_image=True, train=True) == "[INST] <Img><ImageHere></Img> [vqa] where?  [/INST]"
    assert build_prompt("[vqa] where?", has_image=True, train=False) == "[INST] <Img><ImageHere></Img> [vqa] where? [/INST]"
    assert build_prompt("[qa] why?", has_image=False, train=True) == "[INST] [qa] why? [/INST]"


@pytest.mark.parametrize("official", [False, True])
def test_generation_prompt_ids_by_hand(tokenizer, monkeypatch, official):
    """The ids generation starts from, worked out from the spec's templates (section 4). Ours is the
    training prompt's start, `<s>` then the template. The official evaluation template is
    `<s>[INST] <Img><ImageHere></Img> {question} [/INST]`; its first piece is tokenised with the
    tokenizer's own BOS in front, and `<s>` is BOS again; the pieces around the image carry no more."""
    model = tiny_unimed(tokenizer).eval()
    seen = []
    monkeypatch.setattr(model.llama, "generate_from_embeds",
                        lambda embeds, mask, **kw: seen.append((embeds, mask)) or [[tokenizer.eos_id]] * len(embeds))
    sp, bos = tokenizer.sp, tokenizer.bos_id
    embed = lambda ids: model.llama.embed(torch.tensor(ids))
    images = torch.randn(2, 3, 56, 56)
    image_embeds = model.encode_images(images, "vqa")[0]
    cases = [(images, ["[vqa] which side", "[vqa] is the heart round"], "vqa"), (None, ["[qa] where is the liver"], "qa")]
    for imgs, questions, task in cases:
        seen.clear()
        model.generate(imgs, questions, task, max_new_tokens=4, official_prompt=official)
        (embeds, mask), = seen
        for row, q in enumerate(questions):
            if official:
                template = f"<s>[INST] <Img><ImageHere></Img> {q} [/INST]" if imgs is not None else f"<s>[INST] {q} [/INST]"
                first, *rest = template.removeprefix("<s>").split("<ImageHere>")
                pieces = [[bos, bos] + sp.encode(first)] + [sp.encode(r) for r in rest]
            else:
                template = f"[INST] <Img><ImageHere></Img> {q} [/INST]" if imgs is not None else f"[INST] {q} [/INST]"
                first, *rest = template.split("<ImageHere>")
                pieces = [[bos] + sp.encode(first)] + [sp.encode(r) for r in rest]
            assert pieces[0][:2] == [bos, bos] if official else (pieces[0][0] == bos != pieces[0][1])
            want = torch.cat([embed(pieces[0])] + ([image_embeds[row], embed(pieces[1])] if imgs is not None else []))
            length = embeds.shape[1] if mask is None else int(mask[row].sum())  # None: no padding
            assert length == len(want) and torch.equal(embeds[row, -length:], want), (task, row)


def test_labels_cover_only_the_answer_and_eos(tokenizer):
    model = tiny_unimed(tokenizer)
    images = torch.randn(2, 3, 56, 56)
    answers = ["left lung", "yes"]
    embeds, labels, weights, tokens = model.training_inputs(
        images, ["[vqa] which side", "[vqa] is the heart round"], answers, "vqa")
    reals = []
    for row, answer in enumerate(answers):
        before, after = build_prompt(["[vqa] which side", "[vqa] is the heart round"][row], True, True).split("<ImageHere>")
        prompt_len = len(tokenizer.encode(before, bos=False)) + 4 + len(tokenizer.encode(after, bos=False))  # 16 patches / 4
        answer_ids = tokenizer.encode(answer, bos=False, eos=True)
        real = 1 + prompt_len + len(answer_ids)
        reals.append(real)
        assert (labels[row, :1 + prompt_len] == -100).all()
        assert labels[row, 1 + prompt_len:real].tolist() == answer_ids
        assert (labels[row, real:] == -100).all()  # right padding: causal attention keeps it from real tokens
        # the answer's embeddings are the LLaMA's own token embeddings
        assert torch.equal(embeds[row, 1 + prompt_len:real], model.llama.embed.weight[answer_ids])
    assert embeds.shape[1] == labels.shape[1] == max(reals) and weights.shape == (2, 4, 5)
    assert tokens == sum(reals)  # the count train.py logs as tokens/s, counted on the host


def test_training_rows_equal_the_generation_prompts_embedded_apart(tokenizer):
    """One embedding lookup of the batch's ids gives each row the embeddings of its pieces, the
    image spliced in at <ImageHere>; padding to a multiple (compiled training) changes no real token."""
    model = tiny_unimed(tokenizer)
    images, instructions = torch.randn(2, 3, 56, 56), ["[vqa] which side", "[vqa] is the heart round and dark"]
    embeds, labels, weights, _ = model.training_inputs(images, instructions, ["left", "no"], "vqa")
    image_embeds = model.encode_images(images, "vqa")[0]
    for row, prompt in enumerate(model.embed_prompts(instructions, image_embeds, train=True)):
        bos = model.embed_ids([tokenizer.bos_id])
        assert torch.equal(embeds[row, :1 + len(prompt)], torch.cat([bos, prompt]))
    model.pad_to = 64
    padded, padded_labels, _, _ = model.training_inputs(images, instructions, ["left", "no"], "vqa")
    assert padded.shape[1] == 64 and torch.equal(padded[:, :embeds.shape[1]], embeds)
    assert torch.equal(padded_labels[:, :labels.shape[1]], labels) and (padded_labels[:, labels.shape[1]:] == -100).all()


def test_gradients_reach_the_trainable_parts_only(tokenizer):
    model = tiny_unimed(tokenizer)
    model.train()
    loss, _, _ = model(torch.randn(2, 3, 56, 56), ["[refer] where is the lesion"] * 2, ["{<1><2><3><4>}"] * 2, "refer")
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("connector.router.fc1", "connector.experts.0.fc1", "connector.task_tokens.refer", ".lora_B"):
        assert any(part in n for n in got), part
    # lora_A's gradient is exactly zero at the first step (B starts at zero), but it is in the graph
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A" in n)
    assert not any("task_tokens.vqa" in n for n in got)  # only the batch's task token moves
    frozen = [n for n in trainable if not (n.startswith("connector.") or ".lora_" in n)]
    assert not frozen, frozen


def test_text_only_qa_skips_the_image_path(tokenizer):
    model = tiny_unimed(tokenizer)
    loss, weights, _ = model(None, ["[qa] which side is the heart"], ["left"], "qa")
    assert weights is None and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("connector."))


SWITCHES = [dict(resampler=r, rate=4) for r in ("projection", "avgpool", "maxpool")] + \
    [dict(resampler="projection", rate=a) for a in (1, 2)] + \
    [dict(connector=c) for c in ("linear", "mlp")] + \
    [dict(router=r) for r in ("constant", "hard", "sparse", "soft")] + \
    [dict(router_input=i) for i in ("token", "task", "token_task")] + \
    [dict(experts=n, router="soft") for n in (3, 8)] + \
    [dict(connector="mlp", lora_experts=5, lora_r=4, lora_alpha=8), dict(lora_r=16)]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_ablation_switch_runs_one_step(tokenizer, switches):
    model = tiny_unimed(tokenizer, **switches)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss, _, _ = model(torch.randn(2, 3, 56, 56), ["[cls] which colour"] * 2, ["red", "blue"], "cls")
    loss.backward()
    torch.optim.AdamW(params, lr=1e-3).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_trainable_state_roundtrip_and_errors(tokenizer):
    a, b = tiny_unimed(tokenizer, seed=0), tiny_unimed(tokenizer, seed=1)
    b.load_trainable_state_dict(a.trainable_state_dict())
    for (n, p), (_, q) in zip(a.trainable_state_dict().items(), b.trainable_state_dict().items()):
        assert torch.equal(p, q), n
    state = dict(a.trainable_state_dict())
    state["connector.router.fc2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"connector.router.fc2.bias.*\[7\].*\[5\]"):
        b.load_trainable_state_dict(state)
    del state["connector.router.fc2.bias"]
    with pytest.raises(ValueError, match="missing.*connector.router.fc2.bias"):
        b.load_trainable_state_dict(state)


def test_tiny_unimed_overfits_two_tasks_and_generates_the_answers(tokenizer):
    """8 image-text pairs of two tasks: the image alone decides the answer, so the connector must carry it."""
    torch.manual_seed(0)
    model = tiny_unimed(tokenizer, lora_dropout=0.0)
    # Four images, each a different bright quadrant: vqa asks the side, cls the colour word.
    images = torch.full((4, 3, 56, 56), -1.0)
    for i, (y, x) in enumerate(itertools.product((0, 28), (0, 28))):
        images[i, :, y:y + 28, x:x + 28] = 2.0
    batches = [("vqa", ["[vqa] which side"] * 4, ["upper left", "upper right", "lower left", "lower right"]),
               ("cls", ["[cls] what colour"] * 4, ["red", "green", "blue", "dark"])]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(120):
        task, instructions, answers = batches[step % 2]
        loss, _, _ = model(images, instructions, answers, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    losses = [model(images, i, a, t)[0].item() for t, i, a in batches]
    assert max(losses) < 0.05, losses
    for task, instructions, answers in batches:
        assert model.generate(images, instructions, task, max_new_tokens=8) == answers
