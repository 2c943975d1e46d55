"""`adaponder-export`: one training checkpoint as a consolidated Hugging Face directory.

The ZeRO shards of a checkpoint are rebuilt into full fp32 weights (any ZeRO stage, no GPU, no
process group), checked name by name and shape by shape against the model config the run saved in
the checkpoint, and written as `model.safetensors` + `config.json` + the run's tokenizer. The
model's own source files travel along (`model.remote_code`), so the directory loads anywhere with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks ...

and, where this package is imported, without `trust_remote_code`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.hf_compat import match_state_dict
from model.remote_code import write_remote_code
from training.checkpoint import latest_tag, read_train_state
from training.engine import consolidated_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_dir_of(path: Path) -> Path:
    """A run directory or its `checkpoints/` directory -> the directory holding `latest`."""
    for candidate in (path / "checkpoints", path):
        if (candidate / "latest").is_file():
            return candidate
    raise ValueError(f"{path}: neither it nor {path / 'checkpoints'} holds a `latest` checkpoint")


def _save_tokenizer(tokenizer: str | None, output_dir: Path) -> str:
    """Copy the run's tokenizer next to the weights; returns what was done, for the report."""
    if tokenizer is None:
        return "no tokenizer in the run config (pass --tokenizer)"
    path = Path(tokenizer)
    if path.is_dir():
        AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(output_dir))
    elif path.suffix == ".json" and path.is_file():
        PreTrainedTokenizerFast(tokenizer_file=str(path)).save_pretrained(str(output_dir))
    elif path.suffix == ".model" and path.is_file():
        shutil.copy(path, output_dir / "tokenizer.model")
        return f"copied sentencepiece model {path} (transformers needs a tokenizer class for it)"
    else:
        raise ValueError(f"tokenizer {tokenizer}: not found; pass --tokenizer with its current location")
    return f"tokenizer from {path}"


def load_checkpoint_model(
    path: str | Path, tag: str | None = None
) -> tuple[AdaPonderForCausalLM, dict, Path]:
    """Checkpoint `tag` (default: `latest`) of a run as a full fp32 model on the CPU, without a
    DeepSpeed engine or process group (what `adaponder-export` and `adaponder-eval` read).

    Returns the model, the checkpoint's train state and the checkpoint directory.
    """
    checkpoint_dir = checkpoint_dir_of(Path(path))
    tag = tag or latest_tag(checkpoint_dir)
    if not (checkpoint_dir / tag).is_dir():
        raise ValueError(f"{checkpoint_dir}: no checkpoint {tag!r}")
    train_state = read_train_state(checkpoint_dir, tag)
    config = AdaPonderConfig(**train_state["model_config"])
    with torch.device("meta"):
        model = AdaPonderForCausalLM(config)
    state = match_state_dict(consolidated_state_dict(checkpoint_dir, tag), model, source=checkpoint_dir / tag)
    model.load_state_dict(state, strict=True, assign=True)  # every parameter, gates included
    return model, train_state, checkpoint_dir / tag


def export_checkpoint(
    path: str | Path,
    output_dir: str | Path,
    tag: str | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> dict:
    """Write checkpoint `tag` (default: `latest`) of a run as a Hugging Face directory.

    Returns what was exported (also written to `output_dir/export_info.json`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    model, train_state, checkpoint = load_checkpoint_model(path, tag)
    model.to(DTYPES[dtype])

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = write_remote_code(output_dir)
    model.save_pretrained(str(output_dir))
    tokenizer_note = _save_tokenizer(tokenizer or train_state["config"]["data"]["tokenizer"], output_dir)
    info = {
        "checkpoint": str(checkpoint.resolve()),
        "step": train_state.get("step"),
        "consumed_tokens": train_state.get("consumed_tokens"),
        "dtype": dtype,
        "tokenizer": tokenizer_note,
        "parameters": sum(t.numel() for t in model.state_dict().values()),
    }
    (output_dir / "export_info.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaponder-export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (or its checkpoints/ directory)")
    parser.add_argument("output", help="directory to write the Hugging Face checkpoint into")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step-00001000 (default: latest)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--tokenizer", help="tokenizer to ship (default: the run config's data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        info = export_checkpoint(args.run, args.output, args.tag, args.dtype, args.tokenizer)
    except ValueError as e:
        print(f"adaponder-export: error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {info['checkpoint']} (step {info['step']}, {info['parameters']:,} parameters, "
        f"{info['dtype']}) -> {args.output}; {info['tokenizer']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
