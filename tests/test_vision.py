"""EVA ViT-G (vision.py): parity with transformers' Blip2VisionModel, official keys, converter,
preprocessing."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vision import CLIP_MEAN, CLIP_STD, EVAConfig, EVAViT, preprocess, resize_pos_embed
from workshop.convert import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_JSON = os.path.join(ROOT, "tests", "data", "eva_vit_g_keys.json")  # copy of shared/reference
SMALL = EVAConfig(img_size=56, patch_size=14, width=64, depth=3, num_heads=4, mlp_dim=172)


def random_model(config=SMALL, seed=0) -> EVAViT:
    """A model whose every tensor (biases, norms, position embeddings included) is random."""
    torch.manual_seed(seed)
    model = EVAViT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.5) + float(is_norm_scale))
    return model


def blip2_copy(model: EVAViT):
    """transformers' Blip2VisionModel (BLIP-2's copy of EVA ViT-g) holding the same weights."""
    from transformers import Blip2VisionConfig, Blip2VisionModel
    c = model.config
    hf = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, image_size=c.img_size, patch_size=c.patch_size,
        layer_norm_eps=c.eps, qkv_bias=True)).eval()
    ours = model.state_dict()
    theirs = {
        "embeddings.class_embedding": ours["cls_token"],
        "embeddings.position_embedding": ours["pos_embed"],
        "embeddings.patch_embedding.weight": ours["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": ours["patch_embed.proj.bias"],
        "post_layernorm.weight": torch.randn(c.width) * 0.5 + 1,
        "post_layernorm.bias": torch.randn(c.width) * 0.5,
    }
    for i in range(c.depth):
        b, h = f"blocks.{i}.", f"encoder.layers.{i}."
        q, v = ours[b + "attn.q_bias"], ours[b + "attn.v_bias"]
        theirs[h + "self_attn.qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
        for mine, hers in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                           ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                           ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            for kind in ("weight", "bias"):
                if b + f"{mine}.{kind}" in ours:
                    theirs[h + f"{hers}.{kind}"] = ours[b + f"{mine}.{kind}"]
    hf.load_state_dict(theirs, strict=True)
    return hf


def test_parity_with_blip2_vision_model():
    model = random_model()
    hf = blip2_copy(model)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model(images)
        out = hf(pixel_values=images, output_hidden_states=True)
    assert ours.shape == (2, 1 + 16, 64)
    # hidden_states = (embeddings, after layer 1, ..., after layer depth), before post_layernorm
    assert len(out.hidden_states) == SMALL.depth + 1
    assert (ours - out.hidden_states[-1]).abs().max() < 1e-4
    # Blip2's post_layernorm plays ln_vision: applied on top of our features it gives its output
    ln = hf.post_layernorm
    ln_ours = torch.nn.functional.layer_norm(ours, (64,), ln.weight, ln.bias, ln.eps)
    assert (ln_ours - out.last_hidden_state).abs().max() < 1e-4


def test_resized_checkpoint_matches_blip2_interpolation(tmp_path):
    """A 56px checkpoint loaded for 112px images == Blip2 run on 112px with its own interpolation."""
    model = random_model()
    path = str(tmp_path / "small.safetensors")
    save_file(model.state_dict(), path)
    big = EVAViT.from_checkpoint(path, EVAConfig(**{**SMALL.__dict__, "img_size": 112})).eval()
    assert big.pos_embed.shape == (1, 1 + 8 * 8, 64)
    hf = blip2_copy(model)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours = big(images)
        theirs = hf(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True)
    assert (ours - theirs.hidden_states[-1]).abs().max() < 1e-4


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights for the 4 taps around a sample at fraction t."""
    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def bicubic_numpy(grid: np.ndarray, size: int) -> np.ndarray:
    """[g, g, D] -> [size, size, D], half-pixel centres (align_corners=False), edges clamped."""
    g = grid.shape[0]
    m = np.zeros((size, g))  # separable: out = M @ grid @ M^T per channel
    for i in range(size):
        src = (i + 0.5) * g / size - 0.5
        x0 = int(np.floor(src))
        for tap, weight in zip(range(x0 - 1, x0 + 3), cubic_weights(src - x0)):
            m[i, min(max(tap, 0), g - 1)] += weight
    return np.einsum("ia,abd,jb->ijd", m, grid, m)


@pytest.mark.parametrize("g, size", [(4, 8), (16, 32), (6, 4)])
def test_resize_pos_embed_against_hand_bicubic(g, size):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + g * g, 5)
    out = resize_pos_embed(pos, size)
    assert out.shape == (1, 1 + size * size, 5)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS position kept
    expect = bicubic_numpy(pos[0, 1:].reshape(g, g, 5).double().numpy(), size).reshape(size * size, 5)
    assert np.abs(out[0, 1:].double().numpy() - expect).max() < 1e-5
    assert torch.equal(resize_pos_embed(pos, g), pos)  # same grid: unchanged


def test_vit_g_keys_and_shapes_match_official():
    with open(KEYS_JSON) as f:
        ref = json.load(f)
    config = EVAConfig()
    assert ref["config"] == config.__dict__
    with torch.device("meta"):
        model = EVAViT(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    kept = {k: v for k, v in ref["params"].items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < config.depth}
    assert ours == kept
    assert sum(v.numel() for v in model.parameters()) == ref["total_params"]


def official_pth(tmp_path, model):
    """A small checkpoint in the official layout: an extra last block and a stray key, wrapped."""
    state = dict(model.state_dict())
    extra = {k.replace("blocks.0.", f"blocks.{SMALL.depth}."): v.clone()
             for k, v in state.items() if k.startswith("blocks.0.")}
    stray = {"norm.weight": torch.ones(SMALL.width)}
    path = str(tmp_path / "eva_small.pth")
    torch.save({"model": {**state, **extra, **stray}}, path)
    return path, set(extra) | set(stray)


def test_converter_round_trip(tmp_path, capsys):
    model = random_model()
    src, unused = official_pth(tmp_path, model)
    dst = str(tmp_path / "eva_small.safetensors")
    dropped = convert(src, dst, SMALL)
    assert set(dropped) == unused
    printed = capsys.readouterr().out
    assert all(k in printed for k in unused)
    assert not os.path.exists(dst + ".tmp")
    loaded = EVAViT.from_checkpoint(dst, SMALL)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))


def test_unconverted_extra_block_is_skipped(tmp_path):
    """Like the official strict=False load: blocks past config.depth in the file are ignored."""
    model = random_model()
    deeper = random_model(EVAConfig(**{**SMALL.__dict__, "depth": 4}))
    state = {**deeper.state_dict(), **model.state_dict()}
    path = str(tmp_path / "four.safetensors")
    save_file(state, path)
    loaded = EVAViT.from_checkpoint(path, SMALL)
    assert len(loaded.blocks) == 3
    assert torch.equal(loaded.blocks[2].mlp.fc2.weight, model.blocks[2].mlp.fc2.weight)


def test_misshaped_tensor_names_itself(tmp_path):
    state = dict(random_model().state_dict())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        EVAViT.from_checkpoint(path, SMALL)
    msg = str(err.value)
    assert "blocks.1.mlp.fc1.weight" in msg and path in msg and "[100, 64]" in msg and "[172, 64]" in msg


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match=r"\[2, 3, 64, 64\]"):
        random_model()(torch.zeros(2, 3, 64, 64))


def test_frozen_half_precision_close_to_fp32():
    model = random_model()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        full = model(images)
        half = model.to(torch.bfloat16)(images)  # fp32 images are cast to the weights' dtype
    assert half.dtype == torch.bfloat16
    assert ((half.float() - full).norm() / full.norm()) < 0.02


def make_image(mode: str, size=(97, 53), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [224, 448])
def test_preprocess_shape_dtype_range(mode, size):
    x = preprocess(make_image(mode), size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    assert (x >= (0 - mean) / std - 1e-6).all() and (x <= (1 - mean) / std + 1e-6).all()


def test_preprocess_matches_torchvision_style_pipeline():
    """Resize((S, S), BICUBIC) on the PIL image, then ToTensor and Normalize, written in torch."""
    image = make_image("RGB")
    resized = image.resize((224, 224), Image.BICUBIC)  # what torchvision's Resize calls on PIL images
    t = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)  # ToTensor
    t = t.sub(torch.tensor(CLIP_MEAN)[:, None, None]).div(torch.tensor(CLIP_STD)[:, None, None])  # Normalize
    assert torch.allclose(preprocess(image), t, atol=1e-6)


def test_preprocess_constant_colour_uses_clip_statistics():
    """Spec section 6 constants, written out here, on an image whose resize cannot change it."""
    x = preprocess(Image.new("RGB", (31, 70), (255, 0, 128)))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for c, v in enumerate((255, 0, 128)):
        assert torch.allclose(x[c], torch.tensor((v / 255 - mean[c]) / std[c]), atol=1e-6)
