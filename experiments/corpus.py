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
import random
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


# --------------------------------------------------------------------------------------------------
# Generated multi-step programs: tokens whose prediction takes several dependent steps.

_NAMES = "abcdefghijkmnpqrstuvwxyz"


def synthetic_program(rng: random.Random) -> str:
    """A few lines of integer bookkeeping ending in an assert, e.g.

        n = 7
        q = n + 5
        a = q * 3 - n
        assert a == 29

    Every value is determined by the lines above it, so the digits after `=` in the comments and
    after `==` need the whole chain; the rest of the text is easy syntax. Values stay in 0..999.
    """
    names = rng.sample(_NAMES, 6)
    values: dict[str, int] = {}
    lines = []
    for i in range(rng.randint(3, 6)):
        name = names[i]
        if not values:
            values[name] = rng.randint(0, 20)
            lines.append(f"{name} = {values[name]}")
            continue
        src = rng.choice(list(values))
        op, k = rng.choice("+-*"), rng.randint(1, 9)
        value = {"+": values[src] + k, "-": values[src] - k, "*": values[src] * k}[op]
        if not 0 <= value <= 999:
            op, value = "+", values[src] + k
        if value > 999:
            op, value = "-", values[src] - k
        values[name] = value
        line = f"{name} = {src} {op} {k}"
        lines.append(f"{line}  # {value}" if rng.random() < 0.5 else line)
    last = names[len(values) - 1]
    lines.append(f"assert {last} == {values[last]}")
    return "\n".join(lines) + "\n"


def write_synthetic(out_path: Path, max_bytes: int, seed: int) -> dict[str, int]:
    """`{"text": ...}` lines of 20-40 programs each (blank-line separated) until `max_bytes`;
    deterministic for a seed; the file appears atomically."""
    rng = random.Random(seed)
    written = documents = 0
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while True:
            text = "\n".join(synthetic_program(rng) for _ in range(rng.randint(20, 40)))
            line = json.dumps({"text": text}) + "\n"
            if written + len(line) > max_bytes:
                break
            f.write(line)
            written += len(line)
            documents += 1
    os.replace(tmp, out_path)
    return {"documents": documents, "bytes": written}
