"""A real-text corpus every machine has without a download: the Python standard library's source.

Used by the built-in quickstart run and the tests. Deterministic for a given Python installation.
`write_source_jsonl` also writes the study's corpus of installed packages (experiments/corpus.py).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

# Test suites are large and repetitive; site-packages differs between machines.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def build_builtin_corpus(out_path: str, max_bytes: int = 20_000_000) -> int:
    """Write one ``{"text": source}`` line per non-empty stdlib ``.py`` file, stopping before ``max_bytes``.

    Returns the number of documents.
    """
    return write_source_jsonl(_stdlib_sources(), Path(out_path), max_bytes, skip_oversized=False)["documents"]


def write_source_jsonl(
    sources: Iterable[Path], out_path: Path, max_bytes: int, *, skip_oversized: bool
) -> dict[str, int]:
    """One ``{"text": source}`` line per non-empty file of ``sources``, in their order, within ``max_bytes``.

    The first file whose line would pass ``max_bytes`` ends the corpus, or with ``skip_oversized`` is
    passed over (a smaller file later may still fit; the order stays deterministic). The file appears
    atomically (temporary name, then rename). Returns {"documents": lines, "bytes": file size}.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    written = documents = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for path in sources:
                # Some files are not UTF-8; replacing keeps the corpus deterministic.
                text = path.read_bytes().decode("utf-8", errors="replace")
                if not text.strip():
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if written + size > max_bytes:
                    if skip_oversized:
                        continue
                    break
                f.write(line)
                written += size
                documents += 1
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"documents": documents, "bytes": written}
