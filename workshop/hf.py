"""Writing a LLaMA in the official Hugging Face layout: config.json and model.safetensors.

The demo's tiny LLaMA and the benchmarks' random ones are written this way, so that the book's
loader (model.Llama.from_pretrained) reads them exactly as it reads Llama-2-7b-chat-hf.
"""
import os

from safetensors.torch import save

from lib.files import atomic, write_json
from model import Llama, LlamaConfig, translate


def ours_to_hf(name: str) -> str:
    """The official name of one of our parameter names (model.HF_KEYS read right to left)."""
    hf = translate(name, 1)
    if hf is None:
        raise KeyError(f"parameter '{name}' has no official LLaMA name")
    return hf


def hf_config(config: LlamaConfig) -> dict:
    """The `config.json` fields of the official Llama-2 checkpoints."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
            "intermediate_size": config.hidden_dim, "vocab_size": config.vocab_size,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
            "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}


def save_pretrained(model: Llama, path: str) -> None:
    """`model` as an HF model directory: config.json and one model.safetensors, each written atomically."""
    tensors = {ours_to_hf(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    with atomic(os.path.join(path, "model.safetensors")) as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(os.path.join(path, "config.json"), {**hf_config(model.config), "torch_dtype": dtype})
