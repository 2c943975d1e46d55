"""GPT-NeoX / Megatron ``MMIDIDX`` version 1 token shards: a ``.bin``/``.idx`` pair.

``PREFIX.bin`` is every item's tokens back to back, little-endian, no header. ``PREFIX.idx`` is::

    offset      size  field
    0           9     magic b"MMIDIDX\\x00\\x00"
    9           8     version, uint64 = 1
    17          1     dtype code, uint8 (table below)
    18          8     N = number of items, uint64
    26          8     D = number of doc_idx entries, uint64 (documents + 1)
    34          4N    sizes, int32: tokens per item
    34+4N       8N    pointers, int64: byte offset of each item in .bin
    34+12N      8D    doc_idx, int64: item at which each document starts; doc_idx[-1] = N

One item per document is what the preprocessor writes (so doc_idx = 0..N), which is also what
GPT-NeoX's preprocessing produces and what Pythia's Pile shards contain.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import struct
import warnings
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, N, D
_HEADER = struct.Struct("<9sQBQQ")

# GPT-NeoX's codes. Megatron-DeepSpeed swaps 6 and 7; token data only ever uses 4 or 8, where all forks agree.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def _dtype_code(dtype: np.dtype) -> int:
    if dtype not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of {list(_CODE_OF_DTYPE)}")
    return _CODE_OF_DTYPE[dtype]


# Validation walks the index arrays in chunks so opening costs bounded memory whatever N is.
_VALIDATE_CHUNK = 1 << 20


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (the GPT-NeoX threshold, 65500), int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def index_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def data_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def _check_pointers(path: str, sizes: np.ndarray, pointers: np.ndarray, itemsize: int) -> None:
    """pointers must be the exclusive running sum of sizes * itemsize (hence monotone)."""
    if len(sizes) and pointers[0] != 0:
        raise ValueError(f"{path}: pointers[0] is {pointers[0]}, expected 0")
    for lo in range(0, len(sizes), _VALIDATE_CHUNK):
        hi = min(lo + _VALIDATE_CHUNK, len(sizes))
        chunk = sizes[lo:hi]
        if chunk.min() < 0:
            raise ValueError(f"{path}: negative item size in items [{lo}, {hi})")
        expected_next = pointers[lo:hi].astype(np.int64) + chunk.astype(np.int64) * itemsize
        actual_next = pointers[lo + 1 : hi + 1]
        bad = np.flatnonzero(expected_next[: len(actual_next)] != actual_next)
        if len(bad):
            i = lo + int(bad[0])
            raise ValueError(
                f"{path}: pointers are not the running sum of sizes at item {i + 1} "
                f"(got {pointers[i + 1]}, expected {expected_next[bad[0]]}); the index is corrupted"
            )


def _check_doc_idx(path: str, doc_idx: np.ndarray, num_items: int) -> None:
    if doc_idx[0] != 0 or doc_idx[-1] != num_items:
        raise ValueError(
            f"{path}: doc_idx must run from 0 to the number of items {num_items}, "
            f"got {doc_idx[0]} .. {doc_idx[-1]}"
        )
    for lo in range(0, len(doc_idx) - 1, _VALIDATE_CHUNK):
        chunk = doc_idx[lo : lo + _VALIDATE_CHUNK + 1]
        if np.any(chunk[1:] < chunk[:-1]):
            raise ValueError(f"{path}: doc_idx decreases within entries [{lo}, {lo + len(chunk)})")


def write_index(path: str | os.PathLike, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write an ``.idx`` for items of ``sizes`` tokens of ``dtype``; pointers are derived from sizes."""
    dtype = np.dtype(dtype)
    # int64 throughout: the running byte offset passes 2**31 after 1 GiB of tokens.
    pointers = np.zeros(len(sizes), dtype="<i8")
    np.cumsum(np.asarray(sizes[:-1], dtype=np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _dtype_code(dtype), len(sizes), len(doc_idx)))
        f.write(np.asarray(sizes, dtype="<i4").tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


class MMapIndexedDataset:
    """Zero-copy reader of an ``MMIDIDX`` v1 pair; ``ds[i]`` is item i's tokens as a read-only view.

    Opening memory-maps both files and validates the header, array lengths, pointers against sizes,
    doc_idx and the ``.bin`` size, so a truncated or corrupted pair raises ``ValueError`` instead of
    ever returning a wrong sample. Validation reads the ``.idx`` (about 12 bytes per item) but never the
    ``.bin``.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_path(self.prefix), data_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: file not found (shard prefix {self.prefix!r})")
        self.dtype, num_items, num_docs = self._read_header(idx_path)

        self._idx_mmap = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self.sizes = np.frombuffer(self._idx_mmap, dtype="<i4", count=num_items, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(self._idx_mmap, dtype="<i8", count=num_items, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype="<i8", count=num_docs, offset=offset)

        _check_pointers(idx_path, self.sizes, self.pointers, self.dtype.itemsize)
        if num_docs == 1 and num_items > 0 and self.doc_idx[0] == 0:
            # GPT-NeoX's merge_file_ never extends doc_idx (NVIDIA/Megatron-LM#81). Items still read
            # right, and the sample index treats every item as a document, so this is only a warning.
            warnings.warn(
                f"{idx_path}: doc_idx is [0] for {num_items} items (written by a merge that drops "
                "doc_idx); every item is used as a document",
                stacklevel=2,
            )
        else:
            _check_doc_idx(idx_path, self.doc_idx, num_items)

        num_tokens = int(self.pointers[-1]) // self.dtype.itemsize + int(self.sizes[-1]) if num_items else 0
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{bin_path}: size is {bin_bytes} bytes but {idx_path} describes "
                f"{num_tokens * self.dtype.itemsize} bytes ({num_tokens} tokens of {self.dtype}); "
                "the pair is truncated or does not belong together"
            )
        # mmap cannot map an empty file.
        self._tokens = (
            np.memmap(bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
            if num_tokens
            else np.empty(0, dtype=self.dtype)
        )

    @staticmethod
    def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
        file_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{idx_path}: {file_bytes} bytes, too short for the {_HEADER.size}-byte header")
        magic, version, code, num_items, num_docs = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r} (not an MMIDIDX index)")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        if num_docs < 1:
            raise ValueError(f"{idx_path}: doc_idx has {num_docs} entries, needs at least 1")
        expected = _HEADER.size + 12 * num_items + 8 * num_docs
        if file_bytes != expected:
            raise ValueError(
                f"{idx_path}: size is {file_bytes} bytes but the header (N={num_items} items, "
                f"D={num_docs} doc_idx entries) implies {expected}; the file is truncated or corrupted"
            )
        return DTYPE_CODES[code], num_items, num_docs

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of item i (to the item's end when length is None)."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {self.prefix} with {n} items")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for item {i} of size {size}")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def token_id_range(self, chunk: int = 1 << 26) -> tuple[int, int]:
        """(smallest, largest) token id of the whole ``.bin`` (a sequential read in ``chunk``-token
        pieces); (0, -1) for an empty shard."""
        low, high = 0, -1
        for start in range(0, self.num_tokens, chunk):
            part = self._tokens[start : start + chunk]
            low = int(part.min()) if start == 0 else min(low, int(part.min()))
            high = max(high, int(part.max()))
        return low, high

    def first_token_outside(self, vocab_size: int, chunk: int = 1 << 26) -> tuple[int, int, int] | None:
        """(item, position in the item, id) of the first token id outside [0, vocab_size), or None."""
        for start in range(0, self.num_tokens, chunk):
            part = self._tokens[start : start + chunk]
            bad = np.flatnonzero((part >= vocab_size) | (part < 0))
            if len(bad):
                flat = start + int(bad[0])
                item = int(np.searchsorted(self.pointers // self.dtype.itemsize, flat, side="right")) - 1
                return item, flat - int(self.pointers[item]) // self.dtype.itemsize, int(part[bad[0]])
        return None

    # np.memmap pickles as a full copy of the data; DataLoader workers started by spawn or forkserver
    # reopen the files instead.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])


def _remove_dead_writers_files(prefix: str) -> None:
    """Delete ``PREFIX.{bin,idx}.<host>.<pid>.tmp`` files of this host whose writer has died."""
    host = socket.gethostname()
    for final in (data_path(prefix), index_path(prefix)):
        for path in glob.glob(glob.escape(final) + ".*.tmp"):
            writer_host, _, pid = path[len(final) + 1 : -len(".tmp")].rpartition(".")
            if writer_host != host or not pid.isdigit() or _pid_alive(int(pid)):
                continue  # another host's (its pid means nothing here), or still being written
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class MMapIndexedDatasetBuilder:
    """Writes an ``MMIDIDX`` v1 pair. Nothing appears under the final names until ``finalize()``.

    Tokens stream into ``PREFIX.bin.<host>.<pid>.tmp``; ``finalize()`` writes the index beside it and
    renames the ``.bin`` then the ``.idx`` into place (readers need both, so an interrupted rename
    leaves no readable pair). Used as a context manager, leaving the block without ``finalize()`` (an
    exception, Ctrl-C) removes the temporary files; those of a writer killed outright (SIGKILL) are
    removed by the next builder of the same prefix on the same host, once their process is gone.
    """

    def __init__(self, out_prefix: str | os.PathLike, dtype: np.dtype | type):
        self.out_prefix = os.fspath(out_prefix)
        self.dtype = np.dtype(dtype)
        _dtype_code(self.dtype)  # fail before writing anything
        Path(self.out_prefix).parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers_files(self.out_prefix)
        suffix = f".{socket.gethostname()}.{os.getpid()}.tmp"
        self._tmp_bin = data_path(self.out_prefix) + suffix
        self._tmp_idx = index_path(self.out_prefix) + suffix
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        self._finished = False

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one item (a document, when the caller ends a document after each)."""
        self.add_items(np.asarray(tokens), np.array([len(tokens)], dtype=np.int64))

    def add_items(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` items whose tokens are concatenated in ``tokens`` (one write)."""
        tokens = self._checked_cast(np.asarray(tokens))
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != len(tokens):
            raise ValueError(f"lengths sum to {lengths.sum()} but {len(tokens)} tokens were given")
        if len(lengths) and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("item lengths must lie in [0, 2**31) (sizes are int32 in the index)")
        self._bin.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._sizes.frombytes(lengths.astype(np.int32).tobytes())

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append one item per document and end each document (the preprocessor's layout)."""
        first = len(self._sizes)
        self.add_items(tokens, lengths)
        self._doc_idx.frombytes(np.arange(first + 1, len(self._sizes) + 1, dtype=np.int64).tobytes())

    def _checked_cast(self, tokens: np.ndarray) -> np.ndarray:
        if tokens.dtype == self.dtype or tokens.size == 0:
            return tokens
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            lo, hi = tokens.min(), tokens.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"token ids in [{lo}, {hi}] do not fit the shard dtype {self.dtype}")
        return tokens

    def end_document(self) -> None:
        """Mark the items added since the last call as one document."""
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, prefix: str | os.PathLike) -> None:
        """Append every item and document of another shard, offsetting its doc_idx."""
        other = MMapIndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{index_path(prefix)}: dtype {other.dtype} differs from the output's {self.dtype}"
            )
        if len(other.doc_idx) == 1 and len(other):
            # A shard from GPT-NeoX's merge (doc_idx == [0]): one document per item is all we know.
            other_doc_idx = np.arange(len(other) + 1, dtype=np.int64)
        else:
            other_doc_idx = np.asarray(other.doc_idx, dtype=np.int64)
        offset = len(self._sizes)
        self._sizes.frombytes(np.asarray(other.sizes, dtype=np.int32).tobytes())
        self._doc_idx.frombytes((other_doc_idx[1:] + offset).tobytes())
        with open(data_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        if self._finished:
            raise ValueError(f"{self.out_prefix}: builder already finalized or aborted")
        if self._doc_idx[-1] != len(self._sizes):
            # Items added after the last end_document() form the last document.
            self.end_document()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(
            self._tmp_idx,
            self.dtype,
            np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.zeros(0, np.int32),
            np.frombuffer(self._doc_idx, dtype=np.int64),
        )
        os.replace(self._tmp_bin, data_path(self.out_prefix))
        os.replace(self._tmp_idx, index_path(self.out_prefix))
        self._finished = True

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are never touched."""
        self._finished = True
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self.abort()
