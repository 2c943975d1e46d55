"""The study's corpus: Python sources of installed packages, split by package (no package in both).

Every package named here is installed by `pip install -e .` (directly or as a dependency of torch,
transformers, datasets), so a fresh machine builds the same kind of corpus without a download. The
text is deterministic for a given installation: files are taken in the order of a hash of their
path inside the package (a spread over each package rather than its first directories) until a byte
budget is reached. Test suites are left out: they are repetitive and not in every wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    """One `{"text": source}` line per non-empty file until `max_bytes`; atomic (temp, then rename)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    written = documents = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for path in _interleaved(spec.packages):
                text = path.read_bytes().decode("utf-8", errors="replace")
                if not text.strip():
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if written + size > spec.max_bytes:
                    continue  # a smaller file later may still fit; the order stays deterministic
                f.write(line)
                written += size
                documents += 1
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"documents": documents, "bytes": written}
