"""``adaponder-preprocess``: tokenize raw text into an ``MMIDIDX`` shard, or merge shards.

    adaponder-preprocess --input 'corpus/*.jsonl' --tokenizer pythia/ --output-prefix data/corpus --workers 8
    adaponder-preprocess merge --inputs data/a data/b --output-prefix data/ab

One item per document, the end-of-document token appended (``--no-append-eod`` to leave it out),
empty documents skipped. The pair appears only when complete (see ``MMapIndexedDatasetBuilder``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_fitting_dtype
from data.readers import add_text_arguments, expand_inputs, iter_documents
from data.tokenizer import load_tokenizer

# A chunk is the unit sent to a worker: large enough to amortise pickling, small enough to keep
# every worker busy and the progress bar moving.
_CHUNK_DOCS = 256
_CHUNK_CHARS = 1 << 20
# Chunks in flight per worker; bounds memory when reading runs ahead of tokenizing.
_IN_FLIGHT_PER_WORKER = 4
# Longer documents are tokenized in pieces of about this many characters (see encode_document).
_PIECE_CHARS = 1 << 20
_SEAM_CHARS = 512  # context either side of a cut checked for equal ids
_SEARCH_CHARS = 1 << 16  # how far past a piece's nominal end a cut is looked for
_MAX_SEAM_TRIES = 64
_WHITESPACE = re.compile(r"\s")


@dataclass
class PreprocessStats:
    documents: int
    skipped_empty: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class _Encoder:
    """Tokenizes a chunk of texts into (concatenated ids, per-document lengths, empty documents)."""

    def __init__(self, tokenizer_path: str, eod: int | None, dtype: str):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eod = eod
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        docs = []
        for text in texts:
            doc = self.encode_document(text)
            if len(doc):
                docs.append(doc)
        ids = np.concatenate(docs) if docs else np.zeros(0, self.dtype)
        lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
        return ids, lengths, len(texts) - len(docs)

    def encode_document(self, text: str) -> np.ndarray:
        """One document's ids (the end-of-document token appended), tokenized in pieces of about
        `_PIECE_CHARS` characters: the tokenizer holds ~150 bytes per character of what it encodes
        at once, so a 100 MB document in one call would need ~15 GB."""
        pieces = []
        start = 0
        while start < len(text):
            end = self._piece_end(text, start)
            # One encode() per piece: encode_batch would use the Rust thread pool and make --workers
            # meaningless.
            pieces.append(np.array(self.tokenizer.encode(text[start:end]), dtype=self.dtype))
            start = end
        if pieces and self.eod is not None:
            pieces.append(np.array([self.eod], dtype=self.dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _piece_end(self, text: str, start: int) -> int:
        """Where the piece starting at `start` ends: after a whitespace character at which encoding the
        two sides separately gives the same ids as encoding across (checked on `_SEAM_CHARS` either
        side), so the pieces' ids are the whole document's; the document's end if none is found."""
        target = start + _PIECE_CHARS
        if target >= len(text):
            return len(text)
        for i, match in enumerate(_WHITESPACE.finditer(text, target, target + _SEARCH_CHARS)):
            if i == _MAX_SEAM_TRIES:
                break
            cut = match.end()
            left, right = text[cut - _SEAM_CHARS : cut], text[cut : cut + _SEAM_CHARS]
            encode = self.tokenizer.encode
            if encode(left) + encode(right) == encode(left + right):
                return cut
        return len(text)


_worker_encoder: _Encoder | None = None


def _init_worker(*encoder_args) -> None:
    global _worker_encoder
    # Ctrl-C reaches the whole process group; the parent alone handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder = _Encoder(*encoder_args)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    return _worker_encoder(texts)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_chunks(chunks: Iterator[list[str]], workers: int, encoder_args: tuple) -> Iterator[tuple]:
    """Encoded chunks in input order, so any number of workers writes the same shard."""
    if workers == 1:
        yield from map(_Encoder(*encoder_args), chunks)
        return
    # spawn, not fork: the parent may hold pyarrow/tokenizers thread pools that fork would copy mid-use.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=encoder_args,
    )
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def preprocess(
    inputs: list[str],
    tokenizer_path: str,
    output_prefix: str,
    workers: int = 1,
    append_eod: bool = True,
    text_field: str = "text",
    text_mode: str = "file",
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize every document of ``inputs`` (files or globs) into ``output_prefix.{bin,idx}``.

    ``text_mode`` applies to plain-text inputs: "file" makes each file one document, "line" each line.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    eod = tokenizer.eod_id if append_eod else None
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    chunks = _chunks(iter_documents(files, text_field, text_mode))
    encoded = _encode_chunks(chunks, workers, (str(tokenizer_path), eod, dtype.str))

    start = time.perf_counter()
    documents = skipped = tokens = 0
    with (
        MMapIndexedDatasetBuilder(output_prefix, dtype) as builder,
        tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress) as bar,
    ):
        for ids, lengths, empty in encoded:
            builder.add_documents(ids, lengths)
            documents += len(lengths)
            skipped += empty
            tokens += len(ids)
            bar.update(len(ids))
            bar.set_postfix(docs=documents, refresh=False)
        if documents == 0:
            raise ValueError(f"inputs {files}: every document is empty; nothing to write")
        builder.finalize()
    return PreprocessStats(documents, skipped, tokens, time.perf_counter() - start)


def _strip_suffix(prefix: str) -> str:
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def merge(prefixes: list[str], output_prefix: str) -> int:
    """Concatenate shards (items and documents, in order) into one; returns the number of documents."""
    prefixes = [_strip_suffix(p) for p in prefixes]
    if not prefixes:
        raise ValueError("merge needs at least one input shard")
    shards = [MMapIndexedDataset(p) for p in prefixes]  # validates every input before writing
    with MMapIndexedDatasetBuilder(output_prefix, shards[0].dtype) as builder:
        for prefix in prefixes:
            builder.merge_file_(prefix)
        builder.finalize()
    return sum(len(s.doc_idx) - 1 for s in shards)


def _preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaponder-preprocess",
        description="Tokenize raw text into a GPT-NeoX MMIDIDX .bin/.idx shard. "
        "Run 'adaponder-preprocess merge -h' to join shards.",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="input files or globs (jsonl, txt, parquet, ...)"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="HF tokenizer directory, tokenizer.json or sentencepiece .model"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the end-of-document token to every document",
    )
    add_text_arguments(parser)
    return parser


def _merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaponder-preprocess merge", description="Join MMIDIDX shards, keeping doc_idx."
    )
    parser.add_argument("--inputs", nargs="+", required=True, help="shard prefixes, in order")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    is_merge = bool(argv) and argv[0] == "merge"
    parser = _merge_parser() if is_merge else _preprocess_parser()
    args = parser.parse_args(argv[1:] if is_merge else argv)
    # SIGTERM (a scheduler's stop, `kill`) ends it the way Ctrl-C does: the temporary files go.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if is_merge:
            documents = merge(args.inputs, args.output_prefix)
            print(
                f"merged {len(args.inputs)} shards, {documents} documents -> {args.output_prefix}.{{bin,idx}}"
            )
            return 0
        stats = preprocess(
            args.input,
            args.tokenizer,
            args.output_prefix,
            workers=args.workers,
            append_eod=args.append_eod,
            text_field=args.text_field,
            text_mode=args.text_mode,
        )
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing written to {args.output_prefix}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(
        f"{stats.documents} documents ({stats.skipped_empty} empty skipped), {stats.tokens} tokens in "
        f"{stats.seconds:.1f}s ({stats.tokens_per_second:,.0f} tokens/s) -> {args.output_prefix}.{{bin,idx}}"
    )
    return 0
