"""One way to name a model, for every command that reads one (adaponder-generate, adaponder-eval, ...):

    runs/70m                                 a run directory: its newest complete checkpoint
    runs/70m --tag step-00001000             ... or that checkpoint (`latest` names the newest too)
    runs/70m/checkpoints[/step-00001000]     the same, named by its checkpoints directory or tag
    runs/70m/hf                              an export (adaponder-export)
    /ckpt/pythia-410m, /ckpt/PonderingPythia-1.4B   a Pythia / PonderLM Hugging Face directory

A run's checkpoint is consolidated on the CPU without DeepSpeed's engine (training.export); a Pythia
or PonderLM directory loads through `from_pythia` (its gates, absent there, start from their init).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model import AdaPonderConfig, AdaPonderForCausalLM

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: AdaPonderForCausalLM  # fp32, eval mode, on the CPU
    tokenizer: str | None  # where its tokenizer is (directory or tokenizer.json), when known
    described: dict[str, Any]  # path, kind, checkpoint tag and step, for reports


def load_model(path: str | Path, tag: str | None = None) -> LoadedModel:
    """Any model name of the module docstring; ValueError saying what `path` is not."""
    path = Path(path)
    if (path / "config.json").is_file():
        if tag is not None:
            raise ValueError(f"--tag {tag}: {path} is a Hugging Face model directory, not a run directory")
        return _load_hf_directory(path)
    # Imported here: they bring DeepSpeed (seconds), which exports and HF directories do not need.
    from training.checkpoint import TRAIN_STATE_FILE
    from training.export import load_checkpoint_model

    if (path / TRAIN_STATE_FILE).is_file() and tag is None:  # a checkpoint tag named by its directory
        path, tag = path.parent, path.name
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory (expected a run directory, an export or a HF model)")
    try:
        model, train_state, checkpoint = load_checkpoint_model(path, None if tag == "latest" else tag)
    except ValueError as e:
        raise ValueError(
            f"{e}; and {path} has no config.json, so it is not an export or a Hugging Face model directory"
        ) from None
    described = {
        "path": str(path),
        "kind": "run",
        "checkpoint": checkpoint.name,
        "step": train_state.get("step"),
    }
    return LoadedModel(model.float().eval(), train_state["config"]["data"].get("tokenizer"), described)


def _load_hf_directory(path: Path) -> LoadedModel:
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == AdaPonderConfig.model_type:
        model, kind = AdaPonderForCausalLM.from_pretrained(str(path)), "export"
    else:
        model, kind = AdaPonderForCausalLM.from_pythia(str(path)), f"{model_type} checkpoint"
    tokenizer = str(path) if any((path / name).is_file() for name in _TOKENIZER_FILES) else None
    described = {"path": str(path), "kind": kind, "checkpoint": None, "step": None}
    return LoadedModel(model.float().eval(), tokenizer, described)


def load_tokenizer(tokenizer: str) -> PreTrainedTokenizerBase:
    """A tokenizer directory or `tokenizer.json` file (what runs and exports carry)."""
    path = Path(tokenizer)
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        if path.suffix == ".json" and path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except (OSError, ValueError) as e:  # a torn tokenizer_config.json is a bare JSONDecodeError
        raise ValueError(f"tokenizer {tokenizer}: cannot load it ({type(e).__name__}: {e})") from None
    raise ValueError(f"tokenizer {tokenizer}: not a directory or tokenizer.json (pass --tokenizer)")
