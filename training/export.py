"""`adaponder-export`: one training checkpoint as a consolidated Hugging Face directory.

The ZeRO shards of a checkpoint are rebuilt into full fp32 weights (any ZeRO stage, no GPU, no
process group), checked name by name and shape by shape against the model config the run saved in
the checkpoint, and written as `model.safetensors` + `config.json` + the run's tokenizer. The
model's own source files travel along (`model.remote_code`), so the directory loads anywhere with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)   # or PreTrainedTokenizerFast
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks ...

and, where this package is imported, without `trust_remote_code`. (`AutoTokenizer` reads config.json
first, and transformers asks before trusting the model code it names; the tokenizer itself is a
plain fast tokenizer.) The tokenizer pads (Pythia's `<|padding|>`, else end-of-text) and its
`model_max_length` is the model's position table. The export's modes follow the umask.

The checkpoint is verified against its manifest and every `.pt` file passes the weights-only check
(`training.engine.check_safe_to_load`) before DeepSpeed reads it. The export is written to a
temporary directory beside OUTPUT and renamed into place at the end, so OUTPUT is either complete or
absent; an existing OUTPUT is replaced only when empty or an earlier export (it holds
`export_info.json`), and then only what that export wrote (listed in `export_info.json`) is
replaced: anything else there (an `eval/` folder, notes) is moved into the new export. A name the
new export writes that the earlier one did not is refused, not overwritten. An OUTPUT that is a
symbolic link is written where it points.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.hf_compat import match_state_dict
from model.remote_code import write_remote_code
from training.checkpoint import choose_checkpoint, has_checkpoints, read_train_state, verify
from training.engine import consolidated_state_dict
from training.rundir import fsync_path

INFO_FILE = "export_info.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_dir_of(path: Path) -> Path:
    """A run directory or its `checkpoints/` directory -> the directory holding the checkpoints."""
    for candidate in (path / "checkpoints", path):
        if has_checkpoints(candidate):
            return candidate
    raise ValueError(
        f"{path}: neither it nor {path / 'checkpoints'} holds checkpoints (`latest` or step-* directories)"
    )


def _choose_tag(checkpoint_dir: Path, tag: str | None) -> str:
    """The requested tag, or the newest complete checkpoint; verified either way."""
    if tag is None:
        choice = choose_checkpoint(checkpoint_dir, resuming=False)
        for message in choice.messages:
            print(f"adaponder-export: warning: {message}", file=sys.stderr)
        return choice.tag
    if not (checkpoint_dir / tag).is_dir():
        raise ValueError(f"{checkpoint_dir}: no checkpoint {tag!r}")
    problems = verify(checkpoint_dir / tag)
    if problems:
        raise ValueError(f"checkpoint {checkpoint_dir / tag} is not usable: {'; '.join(problems)}")
    return tag


def _check_output(output_dir: Path) -> None:
    if output_dir.is_symlink() and not output_dir.exists():
        target = os.readlink(output_dir)
        raise ValueError(f"output {output_dir} is a symbolic link to {target}, which does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / INFO_FILE).is_file():
        raise ValueError(
            f"output {output_dir} is a non-empty directory that is not an earlier export (no {INFO_FILE}); "
            "refusing to overwrite it: choose another output directory"
        )


def _exported_names(output_dir: Path, new_names: set[str]) -> set[str]:
    """The top-level names an earlier export in `output_dir` wrote: its own list, or (an export
    from before the list was kept) what this export writes."""
    try:
        written = json.loads((output_dir / INFO_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        written = None
    if isinstance(written, list) and all(isinstance(name, str) for name in written):
        return set(written) | {INFO_FILE}
    return new_names | {INFO_FILE}


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished export to `output_dir`, replacing an empty directory or an earlier export;
    files of the earlier directory that no export wrote move into the new one."""
    if not output_dir.exists():
        staging.rename(output_dir)
        fsync_path(output_dir.parent)
        return
    new_names = {p.name for p in staging.iterdir()}
    ours = _exported_names(output_dir, new_names)
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in ours)
    clash = [name for name in foreign if name in new_names]
    if clash:
        raise ValueError(
            f"output {output_dir} holds {', '.join(clash)}, which the earlier export did not write and "
            "this export would overwrite; move them away and export again"
        )
    old = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
    output_dir.rename(old)
    staging.rename(output_dir)
    for name in foreign:  # a crash here leaves them in `old`, beside OUTPUT, never deleted
        (old / name).rename(output_dir / name)
    fsync_path(output_dir)
    fsync_path(output_dir.parent)
    shutil.rmtree(old)  # only the earlier export's own files are left in it


# Pythia's tokenizer has a padding token of its own (id 1); others pad with end-of-text.
_PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")


def _save_tokenizer(tokenizer: str | None, output_dir: Path, max_positions: int) -> str:
    """Copy the run's tokenizer next to the weights, ready for batched use: a pad token and the model's
    context length as `model_max_length`. Returns what was done, for the report."""
    if tokenizer is None:
        return "no tokenizer in the run config (pass --tokenizer)"
    path = Path(tokenizer)
    if path.is_dir():
        # A plain fast tokenizer: no remote code of its own, whatever the source directory's config says.
        loaded = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    elif path.suffix == ".json" and path.is_file():
        loaded = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.suffix == ".model" and path.is_file():
        shutil.copy(path, output_dir / "tokenizer.model")
        return f"copied sentencepiece model {path} (transformers needs a tokenizer class for it)"
    else:
        raise ValueError(f"tokenizer {tokenizer}: not found; pass --tokenizer with its current location")
    loaded.model_max_length = max_positions
    if loaded.pad_token is None:
        vocab = loaded.get_vocab()
        pad = next((t for t in _PAD_CANDIDATES if t in vocab), loaded.eos_token)
        if pad is not None:
            loaded.pad_token = pad
    loaded.save_pretrained(str(output_dir))
    _drop_load_options(output_dir / "tokenizer_config.json")
    return f"tokenizer from {path} (pad token {loaded.pad_token!r}, model_max_length {max_positions})"


def _drop_load_options(tokenizer_config: Path) -> None:
    """transformers saves how the source was loaded (`local_files_only`, ...) as if it were a setting
    of the tokenizer; a colleague loading the export from the Hub must not inherit them."""
    settings = json.loads(tokenizer_config.read_text())
    for key in ("local_files_only", "is_local", "trust_remote_code"):
        settings.pop(key, None)
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")


def _apply_umask(root: Path) -> None:
    """Give the export the modes of any file the user creates: the staging directory comes from
    `mkdtemp` (0700) and safetensors writes 0600, which would hide the export from colleagues."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def load_checkpoint_model(
    path: str | Path, tag: str | None = None
) -> tuple[AdaPonderForCausalLM, dict, Path]:
    """Checkpoint `tag` (default: the newest complete one) of a run as a full fp32 model on the CPU,
    without a DeepSpeed engine or process group (what `adaponder-export` and `adaponder-eval` read).
    The checkpoint is verified (manifest, checksums, weights-only unpickling) first.

    Returns the model, the checkpoint's train state and the checkpoint directory.
    """
    checkpoint_dir = checkpoint_dir_of(Path(path))
    tag = _choose_tag(checkpoint_dir, tag)
    train_state = read_train_state(checkpoint_dir, tag)
    config = AdaPonderConfig(**train_state["model_config"])
    with torch.device("meta"):
        model = AdaPonderForCausalLM(config)
    try:
        weights = consolidated_state_dict(checkpoint_dir, tag)
    except OSError as e:  # verified a moment ago: something removed it since
        raise ValueError(
            f"checkpoint {checkpoint_dir / tag} changed while it was read ({e}); a live run may have pruned "
            "it (checkpoint.keep_last): export a checkpoint the run keeps, or copy it first"
        ) from None
    state = match_state_dict(weights, model, source=checkpoint_dir / tag)
    model.load_state_dict(state, strict=True, assign=True)  # every parameter, gates included
    return model, train_state, checkpoint_dir / tag


def export_checkpoint(
    path: str | Path,
    output_dir: str | Path,
    tag: str | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> dict:
    """Write checkpoint `tag` (default: the newest complete one) of a run as a Hugging Face directory.

    Returns what was exported (also written to `output_dir/export_info.json`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    output_dir = Path(output_dir)
    _check_output(output_dir)
    if output_dir.is_symlink():
        output_dir = output_dir.resolve()  # write where it points; the link itself stays
    model, train_state, checkpoint = load_checkpoint_model(path, tag)
    model.to(DTYPES[dtype])

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    tokenizer = tokenizer or train_state["config"]["data"]["tokenizer"]
    try:
        tokenizer_note = _write_export(model, staging, tokenizer)
        info = {
            "checkpoint": str(checkpoint.resolve()),
            "step": train_state.get("step"),
            "consumed_tokens": train_state.get("consumed_tokens"),
            "dtype": dtype,
            "tokenizer": tokenizer_note,
            "parameters": sum(t.numel() for t in model.state_dict().values()),
            "files": sorted(p.name for p in staging.iterdir()) + [INFO_FILE],
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
        _apply_umask(staging)
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
    return info


def _write_export(model: AdaPonderForCausalLM, out: Path, tokenizer: str | None) -> str:
    """Weights, config, model source and tokenizer into `out`; returns the tokenizer note."""
    model.config.auto_map = write_remote_code(out)
    model.save_pretrained(str(out))
    return _save_tokenizer(tokenizer, out, model.config.max_position_embeddings)


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
