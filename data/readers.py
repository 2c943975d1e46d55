"""Raw-text documents from local files: jsonl, plain text, parquet, and what ``datasets`` reads.

Documents come out in a fixed order (inputs in the order given, glob matches sorted, rows in file
order), so tokenizing the same inputs always produces the same shard.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator

import pyarrow.parquet as pq

_JSONL = (".jsonl", ".jsonl.gz", ".ndjson")
_TEXT = (".txt", ".text", ".md")
_PARQUET = (".parquet",)
# Local formats handed to datasets.load_dataset: suffix -> (builder, extra builder kwargs).
_DATASETS_BUILDERS = {
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".arrow": ("arrow", {}),
}
SUPPORTED_SUFFIXES = _JSONL + _TEXT + _PARQUET + tuple(_DATASETS_BUILDERS)
TEXT_MODES = ("file", "line")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Each pattern is a file or a glob; a pattern matching no file is an error."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            files.append(pattern)
            continue
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"input {pattern}: no such file (and no file matches it as a glob)")
        files.extend(matches)
    for path in files:
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise ValueError(
                f"input {path}: unsupported format; expected a file ending in {SUPPORTED_SUFFIXES}"
            )
    return files


def iter_documents(paths: list[str], text_field: str = "text", text_mode: str = "file") -> Iterator[str]:
    """Every document's text ("" for a null one); a plain-text file is one document or one per line."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode {text_mode!r}: expected one of {TEXT_MODES}")
    for path in paths:
        if path.endswith(_JSONL):
            yield from _iter_jsonl(path, text_field)
        elif path.endswith(_TEXT):
            yield from _iter_text(path, text_mode)
        elif path.endswith(_PARQUET):
            yield from _iter_parquet(path, text_field)
        else:
            yield from _iter_datasets(path, text_field)


def _field(row: dict, text_field: str, where: str) -> str:
    if text_field not in row:
        raise ValueError(f"{where}: no field {text_field!r} (fields: {sorted(row)[:10]})")
    text = row[text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text or ""


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in _numbered_lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            yield _field(row, text_field, f"{path}:{lineno}")


def _numbered_lines(f: Iterator[bytes], path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a binary stream, decoded; decoding and decompression errors name the
    file (and the line)."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e})") from e
            yield lineno, line
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt or truncated after line {lineno} ({e})") from e


def _iter_text(path: str, text_mode: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if text_mode == "file":
            yield f.read()
        else:
            for line in f:
                yield line.rstrip("\n")


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names[:10]})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _iter_datasets(path: str, text_field: str) -> Iterator[str]:
    # datasets takes over a second to import; only these formats need it.
    import datasets

    suffix = os.path.splitext(path)[1]
    builder, kwargs = _DATASETS_BUILDERS[suffix]
    rows = datasets.load_dataset(builder, data_files=path, split="train", streaming=True, **kwargs)
    for i, row in enumerate(rows):
        yield _field(row, text_field, f"{path} row {i}")


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that say where the text is, shared by the data commands."""
    parser.add_argument("--text-field", default="text", help="field/column holding the text")
    parser.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="plain-text inputs: one document per file or line",
    )
