"""The study's corpus: Python sources of installed packages, split by package (no package in both).

Every package named here is installed by `pip install -e .` (directly or as a dependency of torch,
transformers, datasets), so a fresh machine builds the same kind of corpus without a download. The
text is deterministic for a given installation: files are taken in the order of a hash of their
path inside the package (a spread over each package rather than its first directories) until a byte
budget is reached. Test suites are left out: they are repetitive and not in every wheel.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from data.builtin_corpus import write_source_jsonl

# Library code of very different kinds in training; validation is packages never seen in training.
TRAIN_PACKAGES = (
    "torch",
    "transformers",
    "deepspeed",
    "datasets",
    "huggingface_hub",
    "networkx",
    "sympy",
    "tensorboard",
    "fsspec",
    "tqdm",
    "yaml",
)
VALID_PACKAGES = ("numpy", "jinja2", "safetensors", "tokenizers")
_SKIP_DIRS = {"test", "tests", "testing", "__pycache__"}


@dataclass(frozen=True)
class SplitSpec:
    name: str
    packages: tuple[str, ...]
    max_bytes: int


def package_root(name: str) -> Path:
    """The directory of an installed package, found without importing it (torch takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"corpus: package {name!r} is not installed (pip install -e . installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def package_sources(name: str) -> list[tuple[str, Path]]:
    """(key, path) of every .py file of a package outside test directories, sorted by a path hash."""
    root = package_root(name)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                rel = f"{name}/{Path(dirpath, f).relative_to(root).as_posix()}"
                found.append((hashlib.sha1(rel.encode()).hexdigest(), Path(dirpath, f)))
    return sorted(found)


def _interleaved(packages: tuple[str, ...]) -> list[Path]:
    """Files of all packages, round-robin by package, so a byte budget samples every package."""
    queues = [[p for _, p in package_sources(name)] for name in packages]
    out = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def write_split(spec: SplitSpec, out_path: Path) -> dict[str, int]:
    """One `{"text": source}` line per non-empty file, skipping any that would pass `max_bytes`."""
    return write_source_jsonl(_interleaved(spec.packages), out_path, spec.max_bytes, skip_oversized=True)
