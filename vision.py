"""EVA-CLIP ViT-G/14: Uni-Med's frozen image encoder, and the image preprocessing that feeds it.

Uni-Med (like MiniGPT-v2) sees an image through EVA-CLIP's ViT-g/14: a 224x224 image is cut into
16x16 patches of 14x14 pixels, a CLS token is prepended, learned absolute position embeddings are
added, and 39 pre-norm transformer blocks follow. The released checkpoint has 40 blocks; the official
model builds 39 and loads with strict=False, so the last block is never used. There is no final norm
here: the assembled model applies its own `ln_vision` LayerNorm to these features.

Parameter names are exactly the official ones (patch_embed.proj, cls_token, pos_embed, blocks.N.*),
so the official state dict loads with no renaming. The one EVA quirk is the attention bias: `qkv`
is a Linear without bias, and separate `q_bias` and `v_bias` are added, with a zero bias for k.

Position embeddings are tied to the image size. When the configured size differs from the
checkpoint's (e.g. 448 instead of 224), `from_checkpoint` resizes them at load time, as the official
`interpolate_pos_embed` does: the CLS position is kept, the patch grid is resized bicubically
(align_corners=False) in fp32. The model itself then only accepts images of its configured size.
The official `eva_vit_g.pth` is converted once to safetensors: python -m workshop.convert.
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lib.files import load_safetensors, open_safetensors


@dataclass
class EVAConfig:
    img_size: int = 224  # input side in pixels; 224 // 14 = 16x16 patches
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # the checkpoint has 40 blocks; the official model uses the first 39
    num_heads: int = 16  # head dim 88
    mlp_dim: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6  # LayerNorm eps inside the blocks

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


# -------------------------------------------------------------------------------------------------
# The network

class Attention(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.width))
        self.v_bias = nn.Parameter(torch.zeros(config.width))
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # EVA learns biases for q and v only; k's bias is fixed at zero
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3D]
        q, k, v = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim], scale head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official nn.GELU()


class Block(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: EVAConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]


class EVAViT(nn.Module):
    """EVA ViT-G/14 as MiniGPT-v2 / Uni-Med use it: images [B, 3, S, S] -> features [B, 1 + N, width]."""

    def __init__(self, config: EVAConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        # zeros until weights are loaded: the encoder is only ever used with the EVA-CLIP checkpoint
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid ** 2, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"EVAViT expects images [B, 3, {size}, {size}], got {list(images.shape)} "
                             f"(build it with EVAConfig(img_size=...) to change the size)")
        x = self.patch_embed(images.to(self.pos_embed.dtype))  # [B, 256, 1408] at 224
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 257, 1408]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # no final norm: ln_vision follows in the assembled model

    @classmethod
    def from_checkpoint(cls, path: str, config: Optional[EVAConfig] = None,
                        dtype: torch.dtype = torch.float32, device="cpu") -> "EVAViT":
        """Load EVA ViT-G from a .safetensors file (see `convert`), built on meta, never twice in memory.

        Blocks beyond `config.depth` in the file are skipped, as the official strict=False load
        skips block 39. If the file's position grid differs from `config.img_size`, the position
        embeddings are resized here, once (see `resize_pos_embed`).
        """
        config = config or EVAConfig()
        with open_safetensors(path) as f:
            if "pos_embed" not in f.keys():
                raise ValueError(f"{path}: no 'pos_embed' tensor; is this an EVA ViT checkpoint?")
            stored = f.get_tensor("pos_embed")  # [1, 1 + g*g, width], kept for a resize below
        file_grid = math.isqrt(stored.shape[1] - 1) if stored.dim() == 3 else 0
        if file_grid == 0 or file_grid ** 2 + 1 != stored.shape[1]:
            raise ValueError(f"{path}: tensor 'pos_embed' has shape {list(stored.shape)}, "
                             f"expected [1, 1 + g*g, {config.width}] for a square patch grid g")

        def rename(key: str) -> Optional[str]:
            block = key.split(".")[1] if key.startswith("blocks.") else ""
            return None if block.isdigit() and int(block) >= config.depth else key

        # build with the file's grid so every tensor loads as stored; then resize to the config's
        with torch.device("meta"):
            model = cls(replace(config, img_size=file_grid * config.patch_size))
        load_safetensors(model, [path], rename, dtype, device)
        if file_grid != config.grid:
            pos = resize_pos_embed(stored, config.grid).to(device=device, dtype=dtype)
            model.pos_embed = nn.Parameter(pos, requires_grad=model.pos_embed.requires_grad)
        model.config = config
        return model


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: CLS position kept, patch grid resized bicubically.

    Same computation as the official `interpolate_pos_embed` (fp32, align_corners=False), so a model
    run at 448 sees the position embeddings the official one sees.
    """
    pos_embed = pos_embed.float()
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g, D = math.isqrt(patch_pos.shape[1]), patch_pos.shape[2]
    patch_pos = patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)  # [1, D, g, g]
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # [1, grid*grid, D]
    return torch.cat((cls_pos, patch_pos), dim=1)


# -------------------------------------------------------------------------------------------------
# Preprocessing (section 6 of the spec): the same for training and evaluation, no augmentation

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """PIL image -> FloatTensor [3, size, size]: RGB, bicubic resize (aspect not kept), CLIP-normalised.

    Matches the official torchvision pipeline (Resize((size, size), BICUBIC), ToTensor, Normalize):
    torchvision resizes PIL images with PIL's own bicubic, so this is bit-for-bit the same.
    """
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # [size, size, 3] in [0, 1]
    pixels = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # [3, size, size]
