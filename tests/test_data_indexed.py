"""MMIDIDX shard format: golden bytes, round trip, an independent writer, merge, corruption."""

import os
import pickle
import struct

import numpy as np
import pytest

from data import indexed
from data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_fitting_dtype
from data.preprocess import main as preprocess_main

# A worked example of the MMIDIDX layout: documents of 4, 3 and 2 tokens, uint16 (code 8), 102 bytes.
GOLDEN_IDX = bytes.fromhex(
    "4d4d49444944580000"  # magic
    "0100000000000000"  # version 1
    "08"  # dtype code 8 = uint16
    "0300000000000000"  # N = 3 items
    "0400000000000000"  # D = 4 doc_idx entries
    "040000000300000002000000"  # sizes
    "0000000000000000"
    "0800000000000000"
    "0e00000000000000"  # pointers (bytes)
    "0000000000000000"
    "0100000000000000"
    "0200000000000000"
    "0300000000000000"  # doc_idx
)
GOLDEN_DOCS = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]


def write(prefix, docs, dtype=np.uint16):
    with MMapIndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in docs:
            builder.add_item(doc)
            builder.end_document()
        builder.finalize()
    return str(prefix)


def write_by_hand(prefix, items, doc_starts, code, fmt):
    """A second writer that follows the byte layout only: struct, no numpy, no project code."""
    itemsize = struct.calcsize("<" + fmt)
    pointers, offset = [], 0
    for item in items:
        pointers.append(offset)
        offset += len(item) * itemsize
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(items), len(doc_starts))
    body = b"".join(struct.pack("<i", len(i)) for i in items)
    body += b"".join(struct.pack("<q", p) for p in pointers)
    body += b"".join(struct.pack("<q", d) for d in doc_starts)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(header + body)
    with open(f"{prefix}.bin", "wb") as f:
        f.write(b"".join(struct.pack(f"<{len(i)}{fmt}", *i) for i in items))
    return str(prefix)


def test_golden_idx_bytes(tmp_path):
    prefix = write(tmp_path / "golden", GOLDEN_DOCS)
    assert (tmp_path / "golden.idx").read_bytes() == GOLDEN_IDX
    assert (tmp_path / "golden.bin").read_bytes() == struct.pack("<9H", *range(1, 10))
    ds = MMapIndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == GOLDEN_DOCS


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 65_000 if dtype == np.uint16 else 2_000_000
    # Includes 1-token and 0-token items, also at both ends.
    lengths = [0, 1, *rng.integers(1, 300, size=50).tolist(), 1, 0]
    docs = [rng.integers(0, high, size=n).tolist() for n in lengths]
    ds = MMapIndexedDataset(write(tmp_path / "rt", docs, dtype))
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs)
    assert ds.sizes.tolist() == lengths
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    assert ds.num_tokens == sum(lengths)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc
    assert ds.get(2, offset=1, length=0).tolist() == []
    assert ds.get(5, offset=3).tolist() == docs[5][3:]
    assert ds.get(5, offset=2, length=4).tolist() == docs[5][2:6]
    with pytest.raises(IndexError):
        ds.get(5, offset=lengths[5], length=1)
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_reading_is_zero_copy_and_pickles_by_path(tmp_path):
    ds = MMapIndexedDataset(write(tmp_path / "z", GOLDEN_DOCS))
    item = ds[1]
    assert not item.flags.writeable and not item.flags.owndata
    blob = pickle.dumps(ds)
    assert len(blob) < 500
    assert pickle.loads(blob)[2].tolist() == GOLDEN_DOCS[2]


def test_reads_file_from_independent_writer(tmp_path):
    # Two documents of 2 and 1 items, int32 tokens beyond the uint16 range (code 4).
    items = [[70_000, -5, 3], [1], [2**31 - 1, 0]]
    prefix = write_by_hand(tmp_path / "hand", items, [0, 2, 3], code=4, fmt="i")
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(3)] == items
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.pointers.tolist() == [0, 12, 16]
    uint16 = MMapIndexedDataset(
        write_by_hand(tmp_path / "hand16", GOLDEN_DOCS, [0, 1, 2, 3], code=8, fmt="H")
    )
    assert [uint16[i].tolist() for i in range(3)] == GOLDEN_DOCS


def test_best_fitting_dtype():
    assert best_fitting_dtype(50_277) == np.uint16  # Pythia
    assert best_fitting_dtype(65_499) == np.uint16
    assert best_fitting_dtype(65_500) == np.int32


def test_builder_rejects_ids_outside_dtype(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16) as builder:
        with pytest.raises(ValueError, match="do not fit"):
            builder.add_item([1, 70_000])


def test_merge_keeps_doc_idx(tmp_path):
    a = tmp_path / "a"
    with MMapIndexedDatasetBuilder(a, np.uint16) as builder:
        builder.add_item([1, 2])  # document 0 = items 0 and 1
        builder.add_item([3])
        builder.end_document()
        builder.add_item([4, 5, 6])  # document 1 = item 2
        builder.end_document()
        builder.finalize()
    b = write(tmp_path / "b", [[7], [8, 9]])
    preprocess_main(["merge", "--inputs", str(a), b + ".idx", "--output-prefix", str(tmp_path / "ab")])
    merged = MMapIndexedDataset(tmp_path / "ab")
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    assert merged.doc_idx.tolist() == [0, 2, 3, 4, 5]
    assert merged.pointers.tolist() == [0, 4, 6, 12, 14]


def test_shard_without_doc_idx_from_gpt_neox_merge(tmp_path):
    # GPT-NeoX's merge_file_ leaves doc_idx == [0]; such shards exist and must stay readable.
    prefix = write_by_hand(tmp_path / "neox", GOLDEN_DOCS, [0], code=8, fmt="H")
    with pytest.warns(UserWarning, match="doc_idx"):
        ds = MMapIndexedDataset(prefix)
    assert ds[2].tolist() == GOLDEN_DOCS[2]
    with pytest.warns(UserWarning):
        with MMapIndexedDatasetBuilder(tmp_path / "fixed", np.uint16) as builder:
            builder.merge_file_(prefix)
            builder.finalize()
    assert MMapIndexedDataset(tmp_path / "fixed").doc_idx.tolist() == [0, 1, 2, 3]


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, delta):
    os.truncate(path, os.path.getsize(path) + delta)


# (file, corruption, expected message)
CORRUPTIONS = {
    "magic": ("idx", lambda p: _patch(p, 0, b"TNTIDX\x00\x00\x00"), "bad magic"),
    "version": ("idx", lambda p: _patch(p, 9, struct.pack("<Q", 2)), "unsupported version"),
    "dtype_code": ("idx", lambda p: _patch(p, 17, b"\x09"), "unknown dtype code"),
    "idx_truncated": ("idx", lambda p: _truncate(p, -1), "truncated"),
    "idx_header_only": ("idx", lambda p: os.truncate(p, 20), "too short"),
    "idx_extra_byte": ("idx", lambda p: _truncate(p, 1), "implies"),
    "item_count": ("idx", lambda p: _patch(p, 18, struct.pack("<Q", 4)), "implies"),
    "bin_truncated": ("bin", lambda p: _truncate(p, -2), "truncated"),
    "bin_too_long": ("bin", lambda p: _truncate(p, 2), "does not belong"),
    "pointer": ("idx", lambda p: _patch(p, 34 + 12 + 8, struct.pack("<q", 10)), "running sum"),
    "first_pointer": ("idx", lambda p: _patch(p, 34 + 12, struct.pack("<q", 2)), r"pointers\[0\]"),
    "negative_size": ("idx", lambda p: _patch(p, 34 + 4, struct.pack("<i", -3)), "negative"),
    "doc_idx_end": ("idx", lambda p: _patch(p, 34 + 36 + 24, struct.pack("<q", 2)), "doc_idx must run"),
    "doc_idx_order": ("idx", lambda p: _patch(p, 34 + 36 + 8, struct.pack("<q", 3)), "decreases"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_or_truncated_files_are_rejected(tmp_path, name):
    which, corrupt, message = CORRUPTIONS[name]
    prefix = write(tmp_path / "c", GOLDEN_DOCS)
    path = f"{prefix}.{which}"
    corrupt(path)
    with pytest.raises(ValueError, match=message) as info:
        MMapIndexedDataset(prefix)
    assert path in str(info.value)


def test_validation_covers_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_VALIDATE_CHUNK", 4)
    prefix = write(tmp_path / "many", [[i] * (i % 5 + 1) for i in range(23)])
    assert MMapIndexedDataset(prefix)[22].tolist() == [22, 22, 22]
    # Corrupt the pointer of item 21, in the last chunk.
    _patch(f"{prefix}.idx", 34 + 4 * 23 + 8 * 21, struct.pack("<q", 0))
    with pytest.raises(ValueError, match="item 21"):
        MMapIndexedDataset(prefix)


def test_missing_file_named(tmp_path):
    prefix = write(tmp_path / "m", GOLDEN_DOCS)
    os.remove(f"{prefix}.bin")
    with pytest.raises(ValueError, match="m.bin: file not found"):
        MMapIndexedDataset(prefix)


def test_builder_leaves_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(tmp_path / "crash", np.uint16) as builder:
            builder.add_item([1, 2, 3])
            raise RuntimeError("simulated crash")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_an_existing_pair_whole(tmp_path):
    prefix = write(tmp_path / "p", GOLDEN_DOCS)
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_item([42])
        assert MMapIndexedDataset(prefix)[0].tolist() == [1, 2, 3, 4]  # old pair intact until finalize
        builder.finalize()
    assert MMapIndexedDataset(prefix)[0].tolist() == [42]
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]
