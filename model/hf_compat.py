"""Reading Pythia, PonderLM and AdaPonderLM checkpoint directories in Hugging Face format.

A checkpoint directory holds `config.json` and its weights as `model.safetensors`,
`pytorch_model.bin`, or shards listed in `model.safetensors.index.json` /
`pytorch_model.bin.index.json`. Parameter names already match ours; the only differences are the
output head's name (`lm_head.weight` in `transformers` 5 state dicts, `embed_out.weight` in Pythia's
files) and the attention buffers old `.bin` files carry, which are not parameters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from model.config import AdaPonderConfig

_IGNORED_BUFFERS = re.compile(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_GATE_PREFIX = "ponder_gates."


def _gpt_neox_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Backbone fields of a GPTNeoX `config.json`, old (`rotary_pct`) or new (`rope_parameters`)."""
    rope = raw.get("rope_parameters") or {}
    if raw.get("attention_bias", True) is False:
        raise ValueError("checkpoints without attention biases are not GPT-NeoX/Pythia checkpoints")
    if raw.get("tie_word_embeddings", False):
        raise ValueError("checkpoint ties embed_in and embed_out; Pythia's are untied")
    fields = {
        "vocab_size": raw["vocab_size"],
        "hidden_size": raw["hidden_size"],
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": raw["num_attention_heads"],
        "intermediate_size": raw.get("intermediate_size", 4 * raw["hidden_size"]),
        "hidden_act": raw.get("hidden_act", "gelu"),
        "rotary_pct": raw.get("rotary_pct", rope.get("partial_rotary_factor", 0.25)),
        "rotary_emb_base": raw.get("rotary_emb_base", rope.get("rope_theta", 10000.0)),
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "layer_norm_eps": raw.get("layer_norm_eps", 1e-5),
        "use_parallel_residual": raw.get("use_parallel_residual", True),
    }
    for name in ("bos_token_id", "eos_token_id"):
        if raw.get(name) is not None:
            fields[name] = raw[name]
    return fields


def gpt_neox_config(config: AdaPonderConfig, **overrides: Any) -> Any:
    """`transformers`' GPTNeoXConfig of `config`'s backbone (the one-pass model): the reference that
    parity tests and benchmarks compare against; the inverse of `_gpt_neox_fields`."""
    from transformers import GPTNeoXConfig

    names = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "rotary_pct",
        "rotary_emb_base",
        "max_position_embeddings",
        "layer_norm_eps",
        "use_parallel_residual",
    )
    return GPTNeoXConfig(**{name: getattr(config, name) for name in names} | overrides)


# What PonderLM's code (LUMIA-Group/PonderingLM, LLaMA-Factory fork) writes into a GPT-NeoX
# config.json; `mutiply` is its spelling.
_PONDERLM_KEYS = ("ponderinglm", "pondering_steps", "scale_embeds", "mutiply_pondering_steps")
# AdaPonderConfig fields whose defaults would silently change what a checkpoint computes.
_ADAPONDER_REQUIRED = ("num_passes", "scale_embeds", "multiply_pondering_steps", "adaptive", "halt_threshold")


def config_from_checkpoint(path: str | Path, **overrides: Any) -> AdaPonderConfig:
    """The AdaPonderConfig a checkpoint directory describes, with user overrides applied last.

    Vanilla Pythia: neither `scale_embeds` nor `multiply_pondering_steps` (its K=1 forward stays
    Pythia's). PonderLM: its own `pondering_steps` (K - 1), `scale_embeds` and
    `mutiply_pondering_steps` (sic), gates off unless asked for. AdaPonderLM: its config as is.
    A PonderLM or AdaPonderLM config whose pondering fields are missing or inconsistent is a
    ValueError: falling back to defaults would load the weights into a different function.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") == AdaPonderConfig.model_type:
        missing = [k for k in _ADAPONDER_REQUIRED if k not in raw]
        if missing:
            raise ValueError(
                f"{config_file}: an AdaPonderLM config without {missing}; the defaults would change what "
                "the weights compute (set them in config.json)"
            )
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
        return AdaPonderConfig(**{**fields, **overrides})
    if raw.get("model_type") not in (None, "gpt_neox"):
        raise ValueError(f"{config_file}: model_type {raw.get('model_type')!r} is not a GPT-NeoX model")
    fields = _gpt_neox_fields(raw)
    fields.update(_ponderlm_fields(raw, config_file))
    return AdaPonderConfig(**{**fields, **overrides})


def _ponderlm_fields(raw: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """Pondering fields of a GPT-NeoX config.json: Pythia's (none) or PonderLM's (all, consistent)."""
    present = [k for k in _PONDERLM_KEYS if k in raw]
    if "multiply_pondering_steps" in raw:
        raise ValueError(
            f"{config_file}: 'multiply_pondering_steps' in a gpt_neox config; PonderLM writes "
            "'mutiply_pondering_steps' (sic), AdaPonderLM configs have model_type 'adaponder'"
        )
    if not present or raw.get("ponderinglm") is False:
        # Pythia, or a vanilla run of PonderLM's code base: one plain pass.
        return {"scale_embeds": False, "multiply_pondering_steps": False}
    missing = [k for k in _PONDERLM_KEYS[1:] if k not in raw]
    if missing:
        raise ValueError(
            f"{config_file}: PonderLM fields {present} without {missing}; a PonderLM config needs all of "
            f"{list(_PONDERLM_KEYS[1:])} (refusing to guess them)"
        )
    steps = raw["pondering_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{config_file}: pondering_steps {steps!r} must be an integer >= 1 for PonderLM")
    for key in ("scale_embeds", "mutiply_pondering_steps", "ponderinglm"):
        if key in raw and not isinstance(raw[key], bool):
            raise ValueError(f"{config_file}: {key} {raw[key]!r} must be true or false")
    return {
        "num_passes": steps + 1,
        "scale_embeds": raw["scale_embeds"],
        "multiply_pondering_steps": raw["mutiply_pondering_steps"],
        "adaptive": False,
    }


def _weight_files(root: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index}: no weight_map")
            files = [root / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{index} lists shards that do not exist: {missing}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return [root / name]
    raise ValueError(f"{root}: no model.safetensors, pytorch_model.bin or sharded index; nothing to load")


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, on CPU, under the names its files use."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file), device="cpu"))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def match_state_dict(
    raw: dict[str, torch.Tensor], model: nn.Module, source: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename and check a checkpoint's tensors against `model`'s parameters.

    Returns the state dict to load with `strict=False`: every backbone parameter is present with
    the right shape; only gate parameters may be missing (they keep their initialisation).
    """
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if _IGNORED_BUFFERS.search(name):
            continue
        name = "embed_out.weight" if name == "lm_head.weight" else name
        if name not in params:
            raise ValueError(f"{source}: unexpected tensor {name!r} (shape {tuple(tensor.shape)})")
        if tuple(tensor.shape) != _shape(params[name]):
            raise ValueError(
                f"{source}: {name!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{_shape(params[name])}; does config.json match the weights?"
            )
        state[name] = tensor
    missing = sorted(n for n in params if n not in state and not n.startswith(_GATE_PREFIX))
    if missing:
        raise ValueError(f"{source}: missing parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return state
