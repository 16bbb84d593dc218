"""Reading trained checkpoints: ours (train.py's ckpt.pt) and the official runner's checkpoint_N.pth.

`model.UniMed.from_checkpoint` loads both through here; this is the one place that knows the
official names of the trainable tensors and how the official run config maps onto ours.
"""
import os
import re
from typing import Optional

import torch

from lib.files import read_torch

FORMAT = "unimed-ckpt"  # the "format" entry of every checkpoint train.py writes


def is_ours(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT



def read_checkpoint(path: str) -> dict:
    """Load a checkpoint without unpickling code, with an error that says what is wrong with it."""
    ckpt = read_torch(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a Uni-Med checkpoint: expected a dict with a 'model' entry "
                         f"(trainable weights), got {type(ckpt).__name__}"
                         + (f" with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, dict) else ""))
    if is_ours(ckpt):
        missing = [k for k in ("config", "model") if k not in ckpt]
        missing += [f"config.{k}" for k in ("unimed", "vit", "llama_dir", "vit_path", "data_root")
                    if k not in ckpt.get("config", {})]
        if missing:
            raise ValueError(f"{path}: Uni-Med checkpoint without {', '.join(missing)}")
        return ckpt
    if "format" in ckpt:
        raise ValueError(f"{path}: unknown checkpoint format {ckpt['format']!r} (expected {FORMAT!r})")
    if not any(k.startswith(("llm_proj.", "moe_layers.", "task_tokens.", "llm_model.")) for k in ckpt["model"]):
        raise ValueError(f"{path}: not a Uni-Med checkpoint: no 'format' entry (ours) and no "
                         f"official tensors (llm_proj.*, task_tokens.*, llm_model.*) in 'model'")
    return ckpt  # the official layout


# Official names (uni_med/models/uni_med.py; peft wraps the LLaMA as llm_model.base_model.model):
#   task_tokens.<task>                                       [1, 1, task_token_c]
#   llm_proj.<k>.{0,2}.{weight,bias}                         expert k of moe_mlp (0 = Linear in,
#                                                            1 = GELU, 2 = Linear out)
#   moe_layers.<k>.{0,2}.{weight,bias}                       the same experts again (see official_to_ours)
#   llm_proj.{weight,bias} / llm_proj.{0,2}.*                linear / mlp2x_gelu connector
#   router.fc1.*, router.fc2.*                               the router MLP
#   llm_model.base_model.model.model.layers.<i>.{self_attn,mlp}.<proj>.lora_{A,B}.default.weight
OFFICIAL_LORA = re.compile(r"llm_model\.base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                           r"(\w+_proj)\.lora_([AB])\.default\.weight")
OFFICIAL_EXPERT = re.compile(r"llm_proj\.(\d+)\.([02])\.(weight|bias)")
OFFICIAL_BUFFER = re.compile(r".*rotary_emb\.inv_freq")  # RoPE's constant frequencies; we compute them


def official_config(ckpt: dict, path: str, lora_targets: tuple) -> dict:
    """Our UniMedConfig (as a dict) from the official run config saved in the checkpoint."""
    model = (ckpt.get("config") or {}).get("model")
    if not model:
        raise ValueError(f"{path}: official checkpoint without its run config ('config' -> 'model'); "
                         f"the router type and connector cannot be read from the tensors alone")
    projector = model.get("projector_type")
    moe = bool(model.get("has_moe")) and projector in ("moe_mlp", "moe_linear")
    if projector not in ("linear", "mlp2x_gelu", "moe_mlp") or (projector == "moe_mlp") != moe:
        raise ValueError(f"{path}: official projector_type {projector!r} (has_moe "
                         f"{model.get('has_moe')}) has no equivalent here; supported: linear, "
                         f"mlp2x_gelu, moe_mlp with has_moe")
    if moe and model.get("num_task_tokens", 10) != 1:
        raise ValueError(f"{path}: official num_task_tokens {model.get('num_task_tokens')} is not "
                         f"supported (the official encode_img only works with 1)")
    if model.get("lora_target_modules") not in (["all"], list(lora_targets)):
        raise ValueError(f"{path}: official lora_target_modules {model.get('lora_target_modules')} "
                         f"is not supported (only 'all')")
    connector = {
        "resampler": model.get("resample_method", "projection"),
        "rate": model.get("resample_rate", 4),
        "connector": {"linear": "linear", "mlp2x_gelu": "mlp", "moe_mlp": "moe"}[projector],
        "experts": model.get("num_experts", 3) if moe else 1,
        "router": model.get("router_type", "soft"),
        "router_input": {"router_task_token": "token_task", "router_token": "token",
                         "router_task": "task"}[model.get("router_method", "router_task_token")],
        "top_k": model.get("sparse_topk", 2),
    }
    return {"connector": connector, "lora_r": model.get("lora_r", 64),
            "lora_alpha": model.get("lora_alpha", 16), "lora_dropout": model.get("lora_dropout", 0.05)}


def official_to_ours(state: dict, config, path: str = "checkpoint") -> dict:
    """Rename the official trainable tensors to ours; one line says what was kept and dropped.

    The official runner (LAVIS's `_save_checkpoint`) saves `state_dict()` less the keys that
    `named_parameters()` names as frozen, so `checkpoint_N.pth` also holds (1) every expert twice:
    one ModuleDict is registered as `moe_layers` and again as `llm_proj`, and named_parameters()
    names only the first (one equal copy is kept); (2) the buffers state_dict() includes, each
    layer's `rotary_emb.inv_freq` under transformers 4.30 (we compute RoPE's frequencies); (3) a
    router whenever there are experts (its test `router_type == 'soft' or 'sparse'` is always true,
    spec section 10), which a hard or constant router never calls, and task tokens nothing reads
    (linear and MLP connectors, a router that sees the token only). Our router reads [task token,
    token] in the official order, so its weights need no permutation."""
    c = config.connector
    ours, aliases, buffers, unused = {}, [], [], []
    for key, t in state.items():
        if key.startswith("moe_layers."):
            twin = "llm_proj." + key.removeprefix("moe_layers.")
            if twin not in state:
                key = twin  # one copy only: it is the expert all the same
            elif state[twin].shape == t.shape and torch.equal(state[twin], t):
                aliases.append(key)
                continue
            else:
                raise ValueError(f"{path}: '{key}' and '{twin}' differ, but the official model registers "
                                 f"one tensor under both names (llm_proj = moe_layers): the file is inconsistent")
        m_lora, m_expert = OFFICIAL_LORA.fullmatch(key), OFFICIAL_EXPERT.fullmatch(key)
        if OFFICIAL_BUFFER.fullmatch(key):
            buffers.append(key)
        elif m_lora:
            layer, block, proj, ab = m_lora.groups()
            block = "attn" if block == "self_attn" else "mlp"
            ours[f"llama.layers.{layer}.{block}.{proj}.lora_{ab}.weight"] = t
        elif key.startswith(("task_tokens.", "router.")):  # our names too, in the connector
            if c.uses_task_tokens if key.startswith("task_tokens.") else c.uses_router_network:
                ours[f"connector.{key}"] = t
            else:
                unused.append(key)
        elif c.connector == "moe" and m_expert:
            k, layer, kind = m_expert.groups()
            ours[f"connector.experts.{k}.{'fc1' if layer == '0' else 'fc2'}.{kind}"] = t
        elif c.connector == "mlp" and (m := re.fullmatch(r"llm_proj\.([02])\.(weight|bias)", key)):
            ours[f"connector.proj.{'fc1' if m.group(1) == '0' else 'fc2'}.{m.group(2)}"] = t
        elif c.connector == "linear" and key in ("llm_proj.weight", "llm_proj.bias"):
            ours[f"connector.proj.{key.split('.')[1]}"] = t
        else:
            raise ValueError(f"{path}: official tensor '{key}' {list(t.shape)} has no counterpart in "
                             f"a model with connector {c.connector!r}, router {c.router!r}")
    kinds = sorted({k.split(".")[0] for k in unused})
    print(f"{path}: official checkpoint: kept {len(ours)} tensors; dropped {len(aliases)} aliases "
          f"(moe_layers.* = llm_proj.*), {len(buffers)} frozen buffers (rotary_emb.inv_freq), "
          f"{len(unused)} tensors the official model never uses" + (f" ({', '.join(kinds)})" if kinds else ""))
    return ours


def locate(recorded: str, ckpt_path: str) -> str:
    """A path recorded in a checkpoint: as written, else relative to the checkpoint's directory
    (the demo records paths relative to where train.py ran, which is usually beside ckpt.pt)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), recorded)
    return recorded if os.path.exists(recorded) or os.path.isabs(recorded) or not os.path.exists(beside) else beside


def checkpoint_data_root(ckpt: dict, path: str, given: Optional[str] = None) -> str:
    """`given` (--data-root), else the dataset root a checkpoint of ours records (an official one has none)."""
    recorded = ckpt.get("config", {}).get("data_root") if is_ours(ckpt) else None
    if not (given or recorded):
        raise ValueError(f"{path} does not record a data root: name it with --data-root")
    return given or locate(recorded, path)
