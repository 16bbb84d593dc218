"""LLaMA-2 and the assembled Uni-Med.

Part one is LLaMA-2-7B-chat, by hand: RMSNorm, rotary position embeddings in the layout of the HF
weights, grouped-query attention through SDPA, a SwiGLU MLP, an untied head; generation with a
preallocated KV cache; loading the official `Llama-2-7b-chat-hf` safetensors through one key map.

Part two, below the double rule, is Uni-Med: the frozen EVA ViT-G and ln_vision, the Connector-MoE
(cmoe.py) and the LLaMA with LoRA (lora.py), joined by the chat prompt. `UniMed.forward` is the
training loss (Section 3.3); `UniMed.generate` answers; `UniMed.from_checkpoint` loads any trained
checkpoint, ours or the official runner's (lib/checkpoint.py maps the official names).
"""
import contextlib
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmoe import Connector, ConnectorConfig
from lib.checkpoint import is_ours, locate, official_config, official_to_ours, read_checkpoint
from lib.files import load_safetensors, read_json, read_sentencepiece, safetensors_files
from lora import TARGETS as LORA_TARGETS, apply_lora
from vision import EVAConfig, EVAViT


# -------------------------------------------------------------------------------------------------
# Config

@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32        # < n_heads means grouped-query attention
    hidden_dim: int = 11008     # SwiGLU inner width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Read a Hugging Face `config.json` dict (old top-level `rope_theta` or newer `rope_parameters`)."""
        rope = hf.get("rope_parameters") or {}
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        checks = [("rope_scaling", not hf.get("rope_scaling") and rope.get("rope_type", "default") == "default"),
                  ("hidden_act", hf.get("hidden_act", "silu") == "silu"),
                  ("attention_bias", not hf.get("attention_bias")), ("mlp_bias", not hf.get("mlp_bias")),
                  ("tie_word_embeddings", not hf.get("tie_word_embeddings")),
                  ("head_dim", hf.get("head_dim", head_dim) == head_dim)]
        bad = [field for field, ok in checks if not ok]
        if bad:
            raise ValueError(f"config.json: unsupported LLaMA variant ({', '.join(bad)}); this is LLaMA-2")
        return cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], norm_eps=hf["rms_norm_eps"],
                   rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                   max_seq_len=hf["max_position_embeddings"])


# -------------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and cast back before the gain, exactly as the HF reference does in bf16
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, 1, T, head_dim] for integer positions [B, T], computed on the fly (no buffer, so a
    model built on `meta` needs only its weights). The frequencies repeat over the two halves of the
    head ("rotate half"), the layout of the HF q/k weights, so no weight permutation is needed."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq     # [B, T, head_dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_j, x_{j+d/2}) of x [B, H, T, d] by their position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated: k[layer], v[layer] are [B, n_kv_heads, max_len, head_dim].

    The prefill fills slots [0, T); a decoded token goes to a slot given as a device tensor, so a step
    has fixed shapes and no host sync (what torch.compile captures whole). Zeros: masked, but 0 x NaN is NaN.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def update(self, layer: int, k, v, slot: Optional[torch.Tensor]):
        """Store k, v [B, n_kv_heads, T, head_dim]; return what to attend over: a prefill's (slot None)
        own k, v, or after one decoded token at `slot` [1], the whole cache (the caller masks the rest)."""
        if slot is None:
            self.k[layer][:, :, :k.shape[2]] = k
            self.v[layer][:, :, :v.shape[2]] = v
            return k, v
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.dim % config.n_heads or config.n_heads % config.n_kv_heads or config.head_dim % 2:
            raise ValueError(f"LlamaConfig: dim {config.dim}, n_heads {config.n_heads}, n_kv_heads "
                             f"{config.n_kv_heads} must give an even head_dim and whole kv groups")
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache], layer: int, slot: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)    # [B, H, T, d]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, slot)  # decoding: [B, Hkv, max_len, d], the whole cache
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # no mask: causal attention over a whole unpadded sequence
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer: int = 0,
                slot: Optional[torch.Tensor] = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, slot)
        return x + self.mlp(self.mlp_norm(x))


# -------------------------------------------------------------------------------------------------
# Llama

def causal_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T] from key_mask [B, T] (True = real token): a query sees earlier
    real keys, and itself (a padding query would see nothing, and SDPA would give NaN)."""
    pos = torch.arange(key_mask.shape[1], device=key_mask.device)
    allowed = (pos[None, :] <= pos[:, None]) & key_mask[:, None, :]  # [B, T, T]
    return (allowed | torch.eye(len(pos), dtype=torch.bool, device=key_mask.device))[:, None]


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory
        self.cache: Optional[KVCache] = None  # generation's KV cache, kept for the next call of its shape
        self.compiled_decode_step = None      # torch.compile(decode_step), made on first use

    def forward(self, tokens=None, *, inputs_embeds=None, attention_mask=None, cache: Optional[KVCache] = None,
                last_only: bool = False):
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) of tokens [B, T] or inputs_embeds [B, T, dim].

        attention_mask [B, T] (1 = real token) only for padded batches; positions count real tokens,
        so a left-padded row is positioned as unpadded. With `cache`, k and v also go to its first T slots.
        """
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds  # [B, T, dim]
        B, T, _ = x.shape
        if attention_mask is None:  # plain causal attention needs no mask: SDPA's fastest kernel
            positions, mask = torch.arange(T, device=x.device).expand(B, T), None
        else:
            key_mask = attention_mask.bool()
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
            mask = causal_mask(key_mask)                               # [B, 1, T, T]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def decode_step(self, token, slot, key_mask, cache: KVCache, temperature: float, top_p: float):
        """The next token [B] after `token` [B], whose keys go to cache slot `slot` [1], and its logits [B, vocab].

        key_mask [B, max_len] is False on prompt padding; slots after `slot` are masked too. Device tensors
        in, the same shapes at every step, no host sync: torch.compile captures the whole step, embedding
        and sampling included (as one CUDA graph on a GPU)."""
        slots = torch.arange(key_mask.shape[1], device=key_mask.device)
        mask = (key_mask & (slots <= slot))[:, None, None, :]  # [B, 1, 1, max_len]
        positions = slot - (~key_mask).sum(-1, keepdim=True)   # [B, 1]: padding has no position
        x = self.embed(token)[:, None]                         # [B, 1, dim]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, slot)
        logits = self.lm_head(self.norm(x[:, -1]))
        return sample(logits.float(), temperature, top_p), logits

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "Llama":
        """Load an HF LLaMA-2 directory (config.json + safetensors) in eval mode, built on meta first."""
        file = os.path.join(path, "config.json")
        try:
            config = LlamaConfig.from_hf(read_json(file, "LLaMA config.json"))
        except KeyError as e:
            raise ValueError(f"{file}: not a LLaMA config.json, it has no field {e}") from None
        with torch.device("meta"):
            model = cls(config)
        load_safetensors(model, safetensors_files(path), hf_to_ours, dtype, device)
        return model.eval()

    # ---------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: int = 2, compile: bool = False) -> list[list[int]]:
        """New token ids (eos excluded) for each prompt, decoded as one left-padded batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Llama.generate: every prompt needs at least one token")
        device = self.embed.weight.device
        embeds, mask = pad_rows([self.embed(torch.tensor(p, device=device)) for p in prompts], left=True)
        return self.generate_from_embeds(embeds, mask, max_new_tokens, temperature, top_p, eos_id, compile)

    @torch.no_grad()
    def generate_from_embeds(self, inputs_embeds, attention_mask=None, max_new_tokens: int = 100,
                             temperature: float = 0.0, top_p: float = 1.0, eos_id: int = 2,
                             compile: bool = False) -> list[list[int]]:
        """Decode after prompt embeddings [B, T, dim], left-padded with attention_mask [B, T] (1 = real)
        or unpadded (None): the prompt runs once, then each new token goes through `decode_step`."""
        B, T, _ = inputs_embeds.shape
        if max_new_tokens < 1:
            raise ValueError(f"Llama.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"Llama.generate: prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_len {self.config.max_seq_len}")
        if attention_mask is not None and not attention_mask[:, -1].all():
            raise ValueError("Llama.generate: prompts must be left-padded (attention_mask[:, -1] all 1)")
        device = inputs_embeds.device
        cache = self.kv_cache(B, T + max_new_tokens, device, inputs_embeds.dtype, compile)
        step_fn = self.decode_function(compile)
        key_mask = torch.ones(B, cache.k[0].shape[2], dtype=torch.bool, device=device)  # False on prompt padding
        if attention_mask is not None:
            key_mask[:, :T] = attention_mask.bool()
        logits = self(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]
        out = torch.zeros(max_new_tokens, B, dtype=torch.long, device=device)  # step-major: out[step] is contiguous
        out[0] = sample(logits.float(), temperature, top_p)
        slot = torch.full((1,), T, device=device)  # the cache slot of the first new token
        for step in range(1, max_new_tokens):
            # Stop once every row has its eos (rows go on past theirs meanwhile: the tail is cut below).
            # Asking is a host sync, which idles a GPU while Python prepares the next step, so only
            # every 8 tokens, and only if eos can occur.
            if eos_id >= 0 and step % 8 == 0 and (out[:step] == eos_id).any(0).all():
                break
            if compile:
                torch.compiler.cudagraph_mark_step_begin()  # this step overwrites the last one's outputs
            out[step], _ = step_fn(out[step - 1], slot + (step - 1), key_mask, cache, temperature, top_p)
        return [row[:row.index(eos_id)] if eos_id in row else row for row in out.T.tolist()]

    def kv_cache(self, batch: int, length: int, device, dtype, compile: bool) -> KVCache:
        """A cache of at least `length` slots (rounded up to 256: few shapes to compile for), kept for the
        next call: a captured CUDA graph needs its addresses. Old contents are overwritten or masked."""
        length = min(-(-length // 256) * 256, self.config.max_seq_len)
        k = self.cache.k[0] if self.cache else None
        if k is None or (k.shape[0], k.shape[2], k.device, k.dtype) != (batch, length, device, dtype):
            self.cache = None  # free the old cache before allocating the new one
            self.cache = KVCache(self.config, batch, length, device, dtype)
        if compile:  # the captured graph reads and writes the cache in place, at fixed addresses
            for t in self.cache.k + self.cache.v:
                torch._dynamo.mark_static_address(t)
        return self.cache

    def decode_function(self, compile: bool):
        """decode_step, or its compiled form (made once). emulate_precision_casts rounds to bf16 where
        eager does, so the compiled step gives eager's tokens (docs/notes.md)."""
        if not compile:
            return self.decode_step
        if self.compiled_decode_step is None:
            cuda = self.embed.weight.device.type == "cuda"
            self.compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, options={
                "triton.cudagraphs": cuda, "emulate_precision_casts": True})  # cudagraphs: mode reduce-overhead
        return self.compiled_decode_step


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token [B] from logits [B, V]: argmax at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
    # a draw in proportion to the kept mass: the largest p_i / E_i, E_i ~ Exp(1), wins with probability
    # p_i / sum p (torch.multinomial would be a host sync on a GPU, and breaks the compiled graph)
    choice = (sorted_probs / torch.empty_like(sorted_probs).exponential_()).argmax(-1, keepdim=True)
    return order.gather(-1, choice)[:, 0]


# -------------------------------------------------------------------------------------------------
# Loading and saving official weights

# The one explicit map between official HF key names and ours; {i} is a layer index.
HF_KEYS = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def translate(key: str, src: int) -> Optional[str]:
    """`key` mapped through HF_KEYS from column `src` (0: official, 1: ours) to the other; None if no row fits."""
    for row in HF_KEYS:
        m = re.fullmatch(re.escape(row[src]).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return row[1 - src].replace("{i}", m.group(1)) if m.groups() else row[1 - src]
    return None


def hf_to_ours(key: str) -> Optional[str]:
    """Our name for an official key; None drops it; an unknown key passes through (the loader names it)."""
    if key.endswith(".rotary_emb.inv_freq"):
        return None  # RoPE's constant frequencies, stored by some older checkpoints; we compute them
    return translate(key, 0) or key


# -------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """SentencePiece `tokenizer.model` of LLaMA-2, with the ids of HF's slow (legacy) LlamaTokenizer:
    the whole text in one call (so it gets the dummy-prefix space); bos/eos added as ids, never parsed
    from the text. The official pad token is the plain string "$$"; pads are masked everywhere."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        self.sp = read_sentencepiece(path)
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.piece_to_id("$$")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of ids, skipping bos/eos/unk/pad like HF's decode(skip_special_tokens=True)."""
        special = {self.bos_id, self.eos_id, self.unk_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])


def chat_prompt(instruction: str) -> str:
    """The LLaMA-2 chat template Uni-Med uses (no system prompt)."""
    return f"[INST] {instruction} [/INST]"


# =================================================================================================
# Uni-Med: EVA ViT-G -> ln_vision -> resampler -> Connector-MoE -> LLaMA-2-chat + LoRA
#
# The image path turns one image into T_img embeddings in the LLaMA's input space; the text path
# wraps the instruction in the Llama-2 chat prompt and splices those embeddings in at <ImageHere>.
# Only the connector (experts, router, task tokens) and LoRA learn; everything else stays frozen.

@dataclass
class UniMedConfig:
    """Every switch of the paper's ablations (Table 2). Widths come from the base weights."""
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lora_r: int = 8              # Table 2(d) varies it over 4..64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_experts: int = 1        # > 1 turns every LoRA into LoRA-MoE (Table 2e; LORA_MOE below)
    lora_top_k: int = 2          # LoRA-MoE's sparse router keeps this many experts
    max_txt_len: int = 1024      # answer tokens (official config)
    max_context_len: int = 3800  # prompt + image embeddings (official config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UniMedConfig":
        return cls(**{**d, "connector": ConnectorConfig(**d["connector"])})


LORA_MOE = dict(lora_experts=5, lora_r=4, lora_alpha=8.0)  # Table 2(e)'s LoRA-MoE (spec section 3)


def build_prompt(instruction: str, has_image: bool, train: bool) -> str:
    """The Llama-2 chat prompt around one instruction (spec section 4). Training has two spaces before
    [/INST] (the official datasets end the instruction with one, the chat template adds one),
    evaluation one (the official scripts): each is what the official model saw, so we keep both."""
    if not has_image:
        return chat_prompt(instruction)
    return chat_prompt(f"<Img><ImageHere></Img> {instruction}" + (" " if train else ""))


class UniMed(nn.Module):
    """Uni-Med from its parts: the loaded (frozen) ViT and LLaMA, plus a fresh connector and LoRA."""

    def __init__(self, config: UniMedConfig, llama: Llama, vit: EVAViT, tokenizer: Optional[Tokenizer]):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        device = vit.pos_embed.device
        self.vit = vit.requires_grad_(False)
        # A fresh LayerNorm, never trained (spec section 1); it still matters: it normalises the
        # ViT features before the connector. Kept in fp32 like LAVIS's LayerNorm.
        self.ln_vision = nn.LayerNorm(vit.config.width, device=device).requires_grad_(False)
        connector_config = replace(config.connector, vit_width=vit.config.width, llm_width=llama.config.dim)
        self.connector = Connector(connector_config).to(device)
        self.llama = llama.requires_grad_(False)
        apply_lora(self.llama, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   experts=config.lora_experts, top_k=config.lora_top_k)
        self.pad_to = 1  # training rows padded to a multiple of it: compiled code wants few shapes
        # Trainable parameters live in fp32 whatever the base dtype: a bf16 weight cannot hold an
        # update of lr 1e-6 (its 8-bit mantissa rounds it away). Autocast runs the maths in bf16.
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    @classmethod
    def from_pretrained(cls, llama_dir: str, vit_path: str, config: UniMedConfig,
                        vit_config: Optional[EVAConfig] = None, dtype=torch.bfloat16, device="cpu"):
        llama = Llama.from_pretrained(llama_dir, dtype=dtype, device=device)
        vit = EVAViT.from_checkpoint(vit_path, vit_config, dtype=dtype, device=device)
        return cls(config, llama, vit, Tokenizer(os.path.join(llama_dir, "tokenizer.model")))

    @classmethod
    def from_checkpoint(cls, path: str, llama_dir: Optional[str] = None, vit_path: Optional[str] = None,
                        device: str = "cpu", ckpt: Optional[dict] = None) -> "UniMed":
        """A trained Uni-Med, in eval mode, from ours (train.py) or the official runner's checkpoint_N.pth,
        on the base weights it records unless `llama_dir` / `vit_path` name others (an official one
        records no ViT). `ckpt`: the file already read. bf16 base weights on a GPU, fp32 on the CPU."""
        ckpt = ckpt if ckpt is not None else read_checkpoint(path)
        official = not is_ours(ckpt)
        if official:
            config = UniMedConfig.from_dict(official_config(ckpt, path, LORA_TARGETS))
            vit_config = EVAConfig(img_size=ckpt["config"]["model"].get("image_size", 224))
            llama_dir = llama_dir or ckpt["config"]["model"].get("llm_model_path") or None
            if not llama_dir or not vit_path:
                raise ValueError(f"{path} is an official checkpoint: name its base weights with --llama "
                                 f"(HF Llama-2-7b-chat directory) and --vit (EVA ViT-g .safetensors)")
        else:
            config = UniMedConfig.from_dict(ckpt["config"]["unimed"])
            vit_config = EVAConfig(**ckpt["config"]["vit"])
            llama_dir = llama_dir or locate(ckpt["config"]["llama_dir"], path)
            vit_path = vit_path or locate(ckpt["config"]["vit_path"], path)
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model = cls.from_pretrained(llama_dir, vit_path, config, vit_config=vit_config, dtype=dtype, device=device)
        state = official_to_ours(ckpt["model"], config, path) if official else ckpt["model"]
        model.load_trainable_state_dict(state, source=f"{path} (on the base weights {llama_dir} and {vit_path})")
        return model.eval()

    @property
    def image_size(self) -> int:
        return self.vit.config.img_size

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.llama.gradient_checkpointing = enabled

    def autocast(self):
        """Maths in the base dtype (bf16) while the trainable weights stay fp32; off for an fp32 base."""
        weight = self.llama.embed.weight
        return autocast_off(weight.device) if weight.dtype == torch.float32 else \
            torch.autocast(weight.device.type, dtype=weight.dtype)

    # ---- the image path ------------------------------------------------------------------------

    @torch.no_grad()
    def vision_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen ViT -> ln_vision -> drop CLS: [B, 3, H, W] -> [B, N_patches, vit_width] in fp32."""
        features = self.vit(images.to(self.vit.pos_embed.dtype))        # [B, 1 + 256, 1408]
        with autocast_off(features.device):
            features = self.ln_vision(features.float())
        return features[:, 1:]                                           # [B, 256, 1408]

    def encode_images(self, images: torch.Tensor, task: str):
        """Image embeddings for the LLaMA and the routing weights: [B, T_img, D], [B, T_img, N]."""
        return self.connector(self.vision_features(images), task)       # [B, 64, 4096]

    # ---- the text path -------------------------------------------------------------------------

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        embed = self.llama.embed
        return embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))  # [T, D]

    def embed_prompts(self, instructions: list[str], image_embeds: Optional[torch.Tensor],
                      train: bool) -> list[torch.Tensor]:
        """One [T_i, D] embedding per prompt, image embeddings spliced in at <ImageHere>.

        The text on each side of <ImageHere> is tokenised on its own without special tokens, as the
        official prompt_wrap does (so each side gets sentencepiece's leading space)."""
        rows = []
        for i, instruction in enumerate(instructions):
            prompt = build_prompt(instruction, image_embeds is not None, train)
            parts = [self.embed_ids(self.tokenizer.encode(text, bos=False)) for text in prompt.split("<ImageHere>")]
            if image_embeds is not None:  # [before, image, after]
                parts.insert(1, image_embeds[i].to(self.llama.embed.weight.dtype))
            rows.append(torch.cat(parts)[: self.config.max_context_len])  # the official cap on the context
        return rows

    def training_inputs(self, images: Optional[torch.Tensor], instructions: list[str], answers: list[str],
                        task: str):
        """Right-padded rows `<s> prompt answer </s>` for teacher forcing (spec section 4).

        Returns embeds [B, T, D], labels [B, T] (-100 everywhere but on the answer and its </s>, so
        only the answer is learned), the routing weights and the number of real tokens. Ids and labels
        go to the device in one copy; one lookup embeds them, and the image goes in after it. Rows end
        in padding, so under causal attention no real token sees a pad: the LLaMA needs no mask."""
        image_embeds, routing_weights = (None, None) if images is None else self.encode_images(images, task)
        image = [] if image_embeds is None else [0] * image_embeds.shape[1]  # placeholder ids
        rows = []  # (ids, where the answer starts)
        for instruction, answer in zip(instructions, answers):
            before, *after = [self.tokenizer.encode(text, bos=False)
                              for text in build_prompt(instruction, bool(image), train=True).split("<ImageHere>")]
            prompt = (before + image + sum(after, []))[: self.config.max_context_len]  # the official cap
            answer_ids = self.tokenizer.encode(answer, bos=False, eos=True)[: self.config.max_txt_len]
            rows.append(([self.tokenizer.bos_id] + prompt + answer_ids, 1 + len(prompt)))
        T = -(-max(len(ids) for ids, _ in rows) // self.pad_to) * self.pad_to
        host = torch.tensor([[ids + [0] * (T - len(ids)) for ids, _ in rows],
                             [[-100] * a + ids[a:] + [-100] * (T - len(ids)) for ids, a in rows]])  # [2, B, T]
        host = host.pin_memory() if torch.cuda.is_available() else host  # an asynchronous copy
        ids, labels = host.to(self.llama.embed.weight.device, non_blocking=True)
        embeds = self.llama.embed(ids)                                           # [B, T, D]
        if image:  # every row's image starts after the same text, "<s>[INST] <Img>"
            at = 1 + len(before)
            embeds = torch.cat([embeds[:, :at], image_embeds.to(embeds.dtype), embeds[:, at + len(image):]], 1)
        return embeds, labels, routing_weights, sum(len(ids) for ids, _ in rows)

    def forward(self, images: Optional[torch.Tensor], instructions: list[str], answers: list[str],
                task: str):
        """Mean cross-entropy over the answer tokens of one single-task batch, the routing weights
        [B, T_img, N] (None for QA, or a connector without experts) and the batch's token count."""
        with self.autocast():
            embeds, labels, routing_weights, tokens = self.training_inputs(images, instructions, answers, task)
            logits = self.llama(inputs_embeds=embeds)                            # [B, T, V]
        # Position t predicts token t + 1.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100)
        return loss, routing_weights, tokens

    @torch.no_grad()
    def generate(self, images: Optional[torch.Tensor], instructions: list[str], task: str,
                 max_new_tokens: int = 100, temperature: float = 0.0, top_p: float = 1.0,
                 compile: bool = False, official_prompt: bool = False) -> list[str]:
        """Answers for a batch of one task: left-padded prompts, KV cache, greedy by default;
        `compile` compiles the decode step (same tokens, faster on a GPU).

        One BOS, as in training; official_prompt gives two, as the official eval_*.py scripts do
        (their template starts with `<s>` and the tokenizer adds one: spec sections 4 and 10)."""
        with self.autocast():
            image_embeds = None if images is None else self.encode_images(images, task)[0]
            prompts = self.embed_prompts(instructions, image_embeds, train=False)
            bos = self.embed_ids([self.tokenizer.bos_id] * (2 if official_prompt else 1))
            embeds, mask = pad_rows([torch.cat([bos, p]) for p in prompts], left=True)
            new_ids = self.llama.generate_from_embeds(embeds, mask, max_new_tokens=max_new_tokens,
                                                      temperature=temperature, top_p=top_p,
                                                      eos_id=self.tokenizer.eos_id, compile=compile)
        # The official scripts keep the text after the last [/INST], stripped.
        return [self.tokenizer.decode(ids).split("[/INST]")[-1].strip() for ids in new_ids]

    # ---- what training saves --------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy trained weights in. Shapes are checked first: a checkpoint trained on other base
        weights then names the tensor and both shapes rather than a list of missing names."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        for name in params.keys() & state.keys():
            if tuple(state[name].shape) != tuple(params[name].shape):
                raise ValueError(f"{source}: '{name}' has shape {list(state[name].shape)}, "
                                 f"the model needs {list(params[name].shape)}")
        missing = sorted(params.keys() - state.keys())
        unexpected = sorted(state.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(f"{source}: trainable weights do not match this model: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])


def autocast_off(device: torch.device):
    """Autocast off inside (an fp32 base; ln_vision). The meta device (workshop/shapes.py) has none to turn off."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def pad_rows(rows: list[torch.Tensor], left: bool):
    """Stack [T_i, D] rows into [B, T, D] with zero padding, and a {0,1} attention mask [B, T], or
    None when every row has the same length (the LLaMA then needs no mask: its fastest path)."""
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        span = slice(length - r.shape[0], length) if left else slice(0, r.shape[0])
        embeds[i, span], mask[i, span] = r, 1
    return embeds, mask if any(r.shape[0] < length for r in rows) else None
