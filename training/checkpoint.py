"""Checkpoint directory management: tags, `latest`, pruning, RNG state, the train-state sidecar.

Layout (`<run_dir>/checkpoints/`):

    latest                      the tag of the newest *complete* checkpoint (DeepSpeed's format)
    step-00000100/              DeepSpeed's per-rank shards, with our client state inside
    step-00000100/train_state.json   rank 0's client state minus RNG: readable before any process
                                     group exists (to check a resume) and by people

`latest` is written by rank 0 only after a barrier that every rank reaches after writing its files,
so a process killed mid-save leaves `latest` on the previous complete checkpoint. Directories newer
than `latest` are leftovers of such a crash and are removed before the run continues.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import distributed as dist
from training.engine import Engine

TRAIN_STATE_FILE = "train_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise ValueError(f"{latest} names {tag!r}, which does not exist; the checkpoint directory is damaged")
    return tag


def read_train_state(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    path = checkpoint_dir / tag / TRAIN_STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the train state of checkpoint {tag} ({e})") from e


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in checkpoint_dir.iterdir() if checkpoint_dir.is_dir() else []:
        match = _TAG.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_incomplete(checkpoint_dir: Path) -> None:
    """Rank 0: delete step directories newer than `latest` (a save that never completed)."""
    if not dist.is_main_process():
        return
    tag = latest_tag(checkpoint_dir)
    newest = int(_TAG.match(tag).group(1)) if tag else -1
    for step, path in _step_dirs(checkpoint_dir):
        if step > newest:
            print(f"removing incomplete checkpoint {path}", flush=True)
            shutil.rmtree(path)


def save(
    engine: Engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> Path:
    """All ranks: write checkpoint `step`, then point `latest` at it and prune old ones."""
    tag = tag_for(step)
    path = checkpoint_dir / tag
    if dist.is_main_process():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a stale directory from a crashed save; mixing files would corrupt it
            shutil.rmtree(path)
    dist.barrier()
    engine.save(checkpoint_dir, tag, client_state)
    if dist.is_main_process():
        sidecar = {k: v for k, v in client_state.items() if k != "rng"}
        _write_atomic(path / TRAIN_STATE_FILE, json.dumps(sidecar, indent=1))
    dist.barrier()  # every rank has written its shards
    if dist.is_main_process():
        _write_atomic(checkpoint_dir / "latest", tag)
        _prune(checkpoint_dir, keep_last)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(checkpoint_dir: Path, keep_last: int) -> None:
    if keep_last == 0:
        return
    for _, path in _step_dirs(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(path)


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states (Python, NumPy, torch CPU and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
