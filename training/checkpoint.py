"""Checkpoint directory management: tags, manifests, `latest`, choosing where to resume, pruning.

Layout (`<run_dir>/checkpoints/`):

    latest                          the tag of the newest complete checkpoint (DeepSpeed's format)
    step-00000100/                  DeepSpeed's per-rank shards, with our client state inside
    step-00000100/train_state.json  rank 0's client state minus RNG: readable before any process
                                    group exists (to check a resume) and by people
    step-00000100/manifest.json     size and sha256 of every file above; written last
    step-00000100.set-aside/        a directory that was not resumed from (incomplete, damaged, or
                                    newer than the checkpoint resumed from): moved, never deleted

A checkpoint is complete when its manifest lists every rank's shards and the train state and every
file matches its size and checksum. Saving: every rank writes and fsyncs its own files and hashes
them; rank 0 writes the manifest, then `latest` (each through a synced temporary file and rename,
directory synced), and only then prunes older complete checkpoints. A crash at any point leaves
`latest` on a complete, durable checkpoint.

Resuming (`choose_checkpoint`): `latest` if it names a complete checkpoint; otherwise the newest
complete one, said so; a damaged one is reported by file and the next older complete one is used.
Checkpoints present but none complete is an error: never a silent fresh start. Every `.pt` file is
checked by the weights-only unpickler (`engine.check_safe_to_load`) before DeepSpeed loads it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import distributed as dist
from training.engine import Engine, check_safe_to_load
from training.rundir import fsync_path, write_durable

TRAIN_STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
SET_ASIDE_SUFFIX = ".set-aside"
_TAG = re.compile(r"^step-(\d{8})$")
_RANK_OF_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank file names


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag `latest` names, if it names an existing step directory (not checked for completeness)."""
    tag, _ = _read_latest(checkpoint_dir)
    return tag


def _read_latest(checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """(tag, None) when `latest` names a step directory, else (None, what is wrong with it)."""
    latest = checkpoint_dir / "latest"
    try:
        tag = latest.read_text().strip()
    except FileNotFoundError:
        return None, f"{latest} does not exist"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{latest} is unreadable ({e})"
    if not _TAG.match(tag):
        return None, f"{latest} holds {tag[:40]!r}, not a checkpoint tag"
    if not (checkpoint_dir / tag).is_dir():
        return None, f"{latest} names {tag}, which does not exist"
    return tag, None


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


def has_checkpoints(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / "latest").exists() or bool(_step_dirs(checkpoint_dir))


# --------------------------------------------------------------------------------------------------
# Manifests and verification.


def _file_owner(name: str) -> int:
    """The rank that writes (and at save time hashes and fsyncs) a checkpoint file; rank 0 for the rest."""
    match = _RANK_OF_FILE.search(name)
    return int(match.group(1)) if match else 0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (checkpoint shards are GBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe_own_files(path: Path, rank: int) -> dict[str, dict[str, Any]]:
    """This rank's files of checkpoint directory `path`, fsynced; name -> size, sha256, rank."""
    records = {}
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name != MANIFEST_FILE and _file_owner(file.name) == rank:
            fsync_path(file)
            records[file.name] = {"size": file.stat().st_size, "sha256": sha256_file(file), "rank": rank}
    return records


def write_manifest(path: Path, step: int, files: dict[str, dict[str, Any]], world_size: int) -> None:
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "files": files}
    write_durable(path / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    file = path / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        return None, f"{file} does not exist (the save never completed, or an older version wrote it)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{file} is unreadable ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"{file}: not a manifest of format {MANIFEST_FORMAT}"
    files = manifest.get("files", {})
    ranks = {record["rank"] for record in files.values()}
    if TRAIN_STATE_FILE not in files or ranks != set(range(manifest.get("world_size", 0))):
        return None, f"{file}: lists files of ranks {sorted(ranks)}, not all {manifest.get('world_size')}"
    return manifest, None


def verify(path: Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of checkpoint directory `path` (empty: complete and loadable).

    Checks the manifest, and for the files `part` = (index, count) selects, their size, sha256 and,
    for `.pt` files, that they unpickle without anything but allowlisted types. Ranks share the
    work: rank r of n passes (r, n) and the results are gathered.
    """
    manifest, problem = _read_manifest(path)
    if problem:
        return [problem] if part[0] == 0 else []
    problems = []
    for name in sorted(manifest["files"])[part[0] :: part[1]]:
        expected, file = manifest["files"][name], path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {expected['size']}")
        elif sha256_file(file) != expected["sha256"]:
            problems.append(f"{file} is damaged: its sha256 differs from the manifest's")
        elif file.suffix == ".pt":
            try:
                check_safe_to_load(file)
            except ValueError as e:
                problems.append(str(e))
    return problems


def verify_collectively(path: Path) -> list[str]:
    """`verify` with the files shared out over the ranks; the same answer on every rank."""
    mine = verify(path, (dist.rank(), dist.world_size()))
    return [problem for problems in dist.all_gather_object(mine) for problem in problems]


# --------------------------------------------------------------------------------------------------
# Choosing where to resume.


@dataclass
class Choice:
    """Where to resume (None: a fresh start), why, and which newer directories to move aside."""

    tag: str | None
    messages: list[str] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    rewrite_latest: bool = False


def choose_checkpoint(checkpoint_dir: Path, resuming: bool = True) -> Choice:
    """Collective: the checkpoint to resume from (`resuming`; else to read, as an export does),
    verified. Raises ValueError when checkpoints exist but none is complete. Changes nothing on disk
    (see `apply_choice`)."""
    if not has_checkpoints(checkpoint_dir):
        return Choice(None)
    latest, latest_problem = _read_latest(checkpoint_dir)
    steps = _step_dirs(checkpoint_dir)
    newest_first = [path for _, path in reversed(steps)]
    if latest is not None:
        limit = int(_TAG.match(latest).group(1))
        candidates = [path for step, path in reversed(steps) if step <= limit]
    else:
        candidates = newest_first
    messages = [f"{latest_problem}; looking for the newest complete checkpoint"] if latest_problem else []
    rejected = []
    for path in candidates:
        problems = verify_collectively(path)
        if not problems:
            break
        rejected.append(f"{path.name}: {'; '.join(problems)}")
        messages.append(f"checkpoint {path} is not usable: {'; '.join(problems)}")
    else:
        raise ValueError(
            f"{checkpoint_dir} holds checkpoints but none is complete and loadable "
            f"({' | '.join(rejected) or latest_problem}); refusing to start over. Move the directory "
            "away to train from scratch, or restore a complete checkpoint"
        )
    newer = newest_first[: newest_first.index(path)]
    if newer or latest != path.name:
        which = "which `latest` names" if latest == path.name else "the newest complete checkpoint"
        names = ", ".join(p.name for p in newer)
        if resuming:
            aside = f" (moving aside, not deleting: {names})" if newer else ""
            messages.append(f"resuming from {path}, {which}{aside}")
        else:
            aside = f" (not using the newer {names}; left as they are)" if newer else ""
            messages.append(f"reading {path}, {which}{aside}")
    return Choice(path.name, messages, newer, rewrite_latest=latest != path.name)


def apply_choice(checkpoint_dir: Path, choice: Choice) -> None:
    """Rank 0: move the newer, unused directories aside and point `latest` at the chosen one."""
    if not dist.is_main_process():
        return
    for path in choice.set_aside:
        _set_aside(path)
    if choice.rewrite_latest:
        write_durable(checkpoint_dir / "latest", choice.tag)


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + SET_ASIDE_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
    path.rename(target)
    fsync_path(path.parent)
    return target


# --------------------------------------------------------------------------------------------------
# Saving.


def save(
    engine: Engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> Path:
    """All ranks: write checkpoint `step` durably with its manifest, then move `latest`, then prune."""
    tag = tag_for(step)
    path = checkpoint_dir / tag
    if dist.is_main_process():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by an earlier attempt; mixing files would corrupt both
            print(f"moving aside {path} -> {_set_aside(path)}", flush=True)
    dist.barrier()
    engine.save(checkpoint_dir, tag, client_state)
    if dist.is_main_process():
        sidecar = {k: v for k, v in client_state.items() if k != "rng"}
        write_durable(path / TRAIN_STATE_FILE, json.dumps(sidecar, indent=1))
    dist.barrier()  # every rank has written its shards
    files = dist.all_gather_object(_describe_own_files(path, dist.rank()))
    if dist.is_main_process():
        write_manifest(path, step, {name: r for records in files for name, r in records.items()}, len(files))
        fsync_path(path)
        write_durable(checkpoint_dir / "latest", tag)
        _prune(checkpoint_dir, keep_last)
    dist.barrier()
    return path


PRUNING_SUFFIX = ".pruning"


def _prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`; never anything else. A checkpoint is
    first renamed `<tag>.pruning` (so a deletion cut short never looks like a checkpoint) and such
    directories left by an earlier cut are finished off here. A symbolic link among the step
    directories points at data kept elsewhere: it is neither followed nor removed. Called after
    `latest` has moved, so nothing here fails the save: a problem is printed and left for the next."""
    if keep_last == 0:
        return
    try:
        complete = [
            path
            for _, path in _step_dirs(checkpoint_dir)
            if not path.is_symlink() and _read_manifest(path)[1] is None
        ]
        doomed = [_rename_for_pruning(path) for path in complete[:-keep_last]]
        doomed += [p for p in checkpoint_dir.glob(f"*{PRUNING_SUFFIX}*") if p not in doomed]
        for path in doomed:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)
        fsync_path(checkpoint_dir)
    except OSError as e:
        print(f"WARNING: pruning old checkpoints in {checkpoint_dir} failed ({e}); retried at the next save")


def _rename_for_pruning(path: Path) -> Path:
    target = path.with_name(path.name + PRUNING_SUFFIX)
    n = 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}{PRUNING_SUFFIX}.{n}")
    path.rename(target)
    return target


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
