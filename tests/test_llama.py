"""LLaMA-2 of model.py against transformers' LlamaForCausalLM and LlamaTokenizer.

Tiny random models with odd sizes (dim 96, 6 query heads sharing 2 kv heads, MLP 200, vocab 300)
are written by transformers in its sharded on-disk format and loaded by us, and the other way
round; the full 7B shape is checked on the meta device against the official key list.
"""
import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Llama, LlamaConfig, Tokenizer, chat_prompt, hf_to_ours, sample
from workshop.hf import ours_to_hf, save_pretrained

transformers = pytest.importorskip("transformers")

KEYS_7B = os.path.join(os.path.dirname(__file__), "data", "llama2_7b_keys.json")  # copy of shared/reference


def hf_config(n_heads=6, n_kv_heads=2):
    return transformers.LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                    num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=300,
                                    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)


def random_hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # large random weights (norm gains included) so differences show
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf, ours): a random GQA model written by transformers as shards + index, loaded by us."""
    path = str(tmp_path_factory.mktemp("hf_llama"))
    hf = random_hf_model(hf_config())
    hf.save_pretrained(path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return hf, Llama.from_pretrained(path, dtype=torch.float32)


def left_pad(prompts):
    T = max(len(p) for p in prompts)
    ids, mask = torch.zeros(len(prompts), T, dtype=torch.long), torch.zeros(len(prompts), T, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):], mask[row, T - len(p):] = torch.tensor(p), 1
    return ids, mask


# -------------------------------------------------------------------------------------------------
# Forward

@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_logits_match_hf(tmp_path, heads):
    hf = random_hf_model(hf_config(*heads))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    ours = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert not ours.training
    tokens = torch.randint(0, 300, (3, 21))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_bf16_logits_match_hf(tmp_path):
    # same operation order as HF in bf16 (fp32 RMSNorm, cos/sin cast to bf16): far below bf16's own error
    random_hf_model(hf_config()).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    ours = Llama.from_pretrained(str(tmp_path))  # bf16 by default
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        got, ref = ours(tokens), hf(tokens).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max().item() < 1e-3


def test_inputs_embeds_equal_tokens(pair):
    _, ours = pair
    tokens = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        assert torch.equal(ours(tokens), ours(inputs_embeds=ours.embed(tokens)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_hf_and_unpadded(pair, side):
    hf, ours = pair
    tokens = torch.randint(3, 300, (3, 15))
    mask = torch.ones(3, 15, dtype=torch.long)
    pads = slice(0, 6) if side == "left" else slice(9, 15)
    mask[1, pads] = 0
    mask[2, pads.start:pads.start + 2] = 0 if side == "left" else 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate feeds for left padding
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=positions).logits
        got = ours(tokens, attention_mask=mask)
        alone = ours(tokens[1:2, mask[1].bool()])  # the padded row, unpadded
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() < 1e-4
    assert (got[1, real[1]] - alone[0]).abs().max().item() < 1e-4
    assert torch.isfinite(got).all()


def test_gradient_checkpointing_same_gradients(pair):
    _, ours = pair
    tokens = torch.randint(0, 300, (2, 9))
    grads = []
    ours.train()
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        ours(tokens).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    ours.gradient_checkpointing = False
    ours.eval().zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Generation

def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (9, 3, 6, 1)]
    ids, mask = left_pad(prompts)

    def hf_generate(eos_id):
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=eos_id)[:, ids.shape[1]:].tolist()
        return [row[:row.index(eos_id)] if eos_id in row else row for row in out]

    free = hf_generate(eos_id=None)
    assert ours.generate(prompts, max_new_tokens=12, eos_id=-1) == free
    assert ours.generate(prompts, max_new_tokens=1, eos_id=-1) == [row[:1] for row in free]
    # a token that row 0 emits mid-way becomes eos: rows must stop at it, each on its own
    eos = free[0][4]
    expected = hf_generate(eos_id=eos)
    assert len(expected[0]) == free[0].index(eos) < 12
    assert ours.generate(prompts, max_new_tokens=12, eos_id=eos) == expected


def test_generate_from_embeds_is_generate(pair):
    _, ours = pair
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = left_pad(prompts)
    from_embeds = ours.generate_from_embeds(ours.embed(ids).detach(), mask, max_new_tokens=6, eos_id=-1)
    assert from_embeds == ours.generate(prompts, max_new_tokens=6, eos_id=-1)
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate_from_embeds(ours.embed(ids).detach(), mask.flip(1), max_new_tokens=2)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_decoding_gives_the_eager_tokens(pair, backend):
    """The decode step compiles as one graph (fullgraph: a host sync or a data-dependent branch would
    break it) and gives eager's tokens, padded rows and eos included. aot_eager traces exactly what
    inductor compiles, in seconds; inductor itself (generate's default) needs a C compiler and ~40 s."""
    _, ours = pair
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (7, 2, 5)]
    eager = ours.generate(prompts, max_new_tokens=10, eos_id=-1)
    eos = eager[1][3]
    stopped = ours.generate(prompts, max_new_tokens=10, eos_id=eos)
    ours.compiled_decode_step = None if backend == "inductor" else \
        torch.compile(ours.decode_step, backend=backend, fullgraph=True, dynamic=False)
    try:
        assert ours.generate(prompts, max_new_tokens=10, eos_id=-1, compile=True) == eager
        assert ours.generate(prompts, max_new_tokens=10, eos_id=eos, compile=True) == stopped
        # sampling is inside the compiled step too: it must trace without a graph break (fullgraph)
        sampled = ours.generate(prompts, max_new_tokens=10, eos_id=-1, temperature=0.8, top_p=0.9, compile=True)
        assert [len(row) for row in sampled] == [10] * 3 and all(0 <= t < 300 for row in sampled for t in row)
    finally:
        ours.compiled_decode_step = None
    assert len(stopped[1]) == eager[1].index(eos) < 10  # the eos case stops a row early


@pytest.mark.slow
def test_compiled_bf16_decoding_keeps_eager_roundings(pair):
    """In bf16, inductor would run a fused chain of ops (RMSNorm, RoPE, SwiGLU) in fp32 where eager rounds
    to bf16 after each op; generate compiles with emulate_precision_casts, which keeps eager's roundings.
    Without it these greedy tokens part from eager's before the 64th (checked when this test was written)."""
    _, ours = pair
    model = copy.deepcopy(ours).to(torch.bfloat16)
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (7, 2, 5)]
    eager = model.generate(prompts, max_new_tokens=64, eos_id=-1)
    assert model.generate(prompts, max_new_tokens=64, eos_id=-1, compile=True) == eager


def test_top_p_sampling_matches_hf_filter():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.07])
    logits = probs.log()[None]
    kept = transformers.TopPLogitsWarper(top_p=0.7)(None, logits.clone()).isfinite()[0]
    torch.manual_seed(0)
    draws = sample(logits.expand(6000, -1), temperature=1.0, top_p=0.7)
    freq = torch.bincount(draws, minlength=6) / 6000
    assert torch.equal(freq > 0, kept)
    assert torch.allclose(freq[kept], probs[kept] / probs[kept].sum(), atol=0.03)
    assert torch.equal(sample(logits * 3, temperature=0.0, top_p=1.0), torch.tensor([0]))


# -------------------------------------------------------------------------------------------------
# Writing and loading checkpoints

def test_save_pretrained_loads_in_hf(tmp_path):
    config = LlamaConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=200, vocab_size=300,
                         max_seq_len=128)
    torch.manual_seed(0)
    ours = Llama(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    save_pretrained(ours, str(tmp_path))
    assert LlamaConfig.from_hf(json.load(open(tmp_path / "config.json"))) == config
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def test_7b_shapes_on_meta():
    with torch.device("meta"):
        model = Llama(LlamaConfig())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    reference = json.load(open(KEYS_7B))
    assert LlamaConfig.from_hf(reference["config"]) == LlamaConfig()
    ours = {ours_to_hf(name): list(p.shape) for name, p in model.state_dict().items()}
    assert ours == reference["params"]
    assert all(hf_to_ours(ours_to_hf(name)) == name for name in model.state_dict())


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=64)
    save_pretrained(Llama(config), str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    return str(tmp_path), path, load_file(path)


def test_bad_checkpoints_name_tensor_file_and_shapes(tiny_checkpoint):
    directory, path, tensors = tiny_checkpoint
    file = re.escape(path)
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({**tensors, key: torch.zeros(32, 32)}, path)
    with pytest.raises(ValueError, match=rf"{file}.*'{key}'.*\[32, 32\].*\[16, 32\]"):
        Llama.from_pretrained(directory)

    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, path)
    with pytest.raises(ValueError, match=rf"missing tensors in {file}: 'norm.weight' \[32\]"):
        Llama.from_pretrained(directory)

    extra = "model.layers.0.self_attn.q_norm.weight"
    save_file({**tensors, extra: torch.zeros(8)}, path)
    with pytest.raises(ValueError, match=rf"{file}: unexpected tensor '{extra}'"):
        Llama.from_pretrained(directory)

    # older checkpoints carry RoPE's inv_freq; it is dropped on purpose
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}, path)
    Llama.from_pretrained(directory)


# -------------------------------------------------------------------------------------------------
# Tokenizer

WORDS = ("the patient chest x-ray shows normal heart lung findings impression no acute disease where is "
         "left right kidney liver location [INST] [/INST] [vqa] [caption] [refer] <Img><ImageHere></Img> yes "
         "maybe 12 345 {<10><20><30><40>}").split()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Ours and HF's on a LLaMA-like SentencePiece model (BPE, byte fallback, identity normalisation)."""
    import random
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
    rng = random.Random(0)
    prefix = str(tmp_path_factory.mktemp("spm") / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]),
        model_prefix=prefix, vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    # transformers 5 has no slow LlamaTokenizer; LlamaTokenizer(legacy=True) on the vocab and merges of
    # the .model file is what from_pretrained builds (it needs protobuf to read the file itself)
    vocab, _, merges = SentencePieceExtractor(prefix + ".model").extract()
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)
    return Tokenizer(prefix + ".model"), hf


TEXTS = [chat_prompt("[vqa] Based on the image, respond to this question with a short answer: where is the liver?"),
         chat_prompt("<Img><ImageHere></Img> [refer] give me the location of left kidney"),
         "[INST] Describe  the chest\nx-ray.\n\n [/INST] no acute disease",
         "héllo wörld ✓ 中文 — 12345 {<10><20><30><40>}", "tab\there", "x"]


def test_tokenizer_ids_match_hf(tokenizers):
    ours, hf = tokenizers
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert ours.pad_id == hf.convert_tokens_to_ids("$$")  # the official pad token
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, eos=True) == hf.encode(text + "</s>"), text
        ids = ours.encode(text, eos=True)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
