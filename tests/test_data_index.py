"""Sample index (against a slow reference walk), epochs, cache, blending, splits, build_datasets."""

import dataclasses
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from data import dataset as dataset_module
from data import sample_index
from data.config import DataConfig
from data.dataset import BlendedDataset, GPTDataset, build_datasets, split_range
from data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder
from data.sample_index import build_blend_schedule, build_index, build_sample_idx, num_epochs_needed


def reference_sample_idx(sizes, doc_idx, seq_len, num_samples):
    """GPT-NeoX's walk, one sample at a time (megatron/data/gpt2_dataset.py, _build_sample_idx)."""
    out = [(0, 0)]
    d, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_len + 1
        while remaining != 0:
            doc_len = int(sizes[doc_idx[d]]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - 1  # the last token is shared with the next sample
                remaining = 0
            else:
                d += 1
                offset = 0
        out.append((d, offset))
    return np.array(out)


def reference_num_epochs(tokens_per_epoch, seq_len, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_len >= num_samples:
            return epochs


def write_shard(prefix, lengths):
    """A shard whose tokens are their own positions in the file, so every token is unique."""
    lengths = np.asarray(lengths, dtype=np.int64)
    with MMapIndexedDatasetBuilder(prefix, np.int32) as builder:
        builder.add_documents(np.arange(lengths.sum(), dtype=np.int32), lengths)
        builder.finalize()
    return MMapIndexedDataset(prefix)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("doc_chunk", [3, 1 << 22])
def test_sample_idx_matches_reference_walk(seed, doc_chunk, monkeypatch):
    monkeypatch.setattr(sample_index, "_DOC_CHUNK", doc_chunk)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, size=int(rng.integers(1, 60))).astype(np.int32)
    sizes[rng.integers(len(sizes))] = 1 + rng.integers(50)  # at least one token somewhere
    doc_idx = rng.permutation(np.tile(np.arange(len(sizes), dtype=np.int32), 3))
    seq_len = int(rng.choice([1, 2, 7, 16, 33]))
    num_samples = (int(sizes.sum()) * 3 - 1) // seq_len
    expected = reference_sample_idx(sizes, doc_idx, seq_len, num_samples)
    np.testing.assert_array_equal(build_sample_idx(sizes, doc_idx, seq_len, num_samples), expected)
    # Fewer samples than the documents hold: the prefix of the same walk.
    np.testing.assert_array_equal(
        build_sample_idx(sizes, doc_idx, seq_len, num_samples // 2), expected[: num_samples // 2 + 1]
    )


def test_sample_idx_rejects_too_few_tokens():
    with pytest.raises(ValueError, match="too few tokens"):
        build_sample_idx(np.array([5], np.int32), np.array([0]), 4, 2)


@pytest.mark.parametrize(
    ("tokens", "seq_len", "num_samples"), [(100, 10, 9), (100, 10, 10), (7, 3, 50), (5, 8, 1)]
)
def test_num_epochs_matches_gpt_neox_loop(tokens, seq_len, num_samples):
    assert num_epochs_needed(tokens, seq_len, num_samples) == reference_num_epochs(
        tokens, seq_len, num_samples
    )


def test_build_index_follows_gpt_neox_rng_order():
    sizes = np.array([5, 9, 3, 7, 11], dtype=np.int32)
    index = build_index(sizes, range(1, 5), seq_len=4, num_samples=12, seed=7)
    # 30 tokens in documents 1..4, 12 samples of 4 new tokens need 2 epochs.
    rng = np.random.RandomState(7)
    doc_idx = np.tile(np.arange(1, 5), 2)
    rng.shuffle(doc_idx)
    shuffle_idx = np.arange((60 - 1) // 4)
    rng.shuffle(shuffle_idx)
    np.testing.assert_array_equal(index["doc_idx"], doc_idx)
    np.testing.assert_array_equal(index["shuffle_idx"], shuffle_idx)
    np.testing.assert_array_equal(index["sample_idx"], reference_sample_idx(sizes, doc_idx, 4, 14))


def stream_of(shard, doc_idx):
    return np.concatenate([shard[int(d)] for d in doc_idx])


def test_samples_are_cut_from_the_shuffled_stream(tmp_path):
    shard = write_shard(tmp_path / "s", np.random.default_rng(1).integers(1, 30, size=40))
    ds = GPTDataset(shard, range(len(shard)), num_samples=50, seq_len=16, seed=3)
    stream = stream_of(shard, ds.index["doc_idx"])
    assert len(ds) >= 50
    for i in range(len(ds)):
        j = int(ds.index["shuffle_idx"][i])
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        np.testing.assert_array_equal(sample, stream[j * 16 : j * 16 + 17])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_one_epoch_every_token_once_across_ranks_and_steps(tmp_path):
    from data.loader import build_dataloader
    from data.sampler import PretrainingSampler

    seq_len, dp, micro = 8, 3, 2
    # Exactly 4 global batches of samples, plus the final shared token.
    total = 4 * dp * micro * seq_len + 1
    rng = np.random.default_rng(2)
    lengths = np.diff(
        np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), 29, replace=False)), [total]])
    )
    shard = write_shard(tmp_path / "e", lengths)
    ds = GPTDataset(shard, range(len(shard)), num_samples=4 * dp * micro, seq_len=seq_len, seed=5)
    assert len(ds) == 4 * dp * micro and int(ds.index["doc_idx"].shape[0]) == len(shard)

    inputs = []
    for rank in range(dp):
        sampler = PretrainingSampler(len(ds), 0, micro, rank, dp, ds.fingerprint)
        for batch in build_dataloader(ds, sampler, num_workers=0):
            assert batch.shape == (micro, seq_len + 1)
            inputs.append(batch[:, :-1].numpy().ravel())
    counts = np.bincount(np.concatenate(inputs), minlength=total)
    stream_last = shard[int(ds.index["doc_idx"][-1])][-1]
    assert counts[stream_last] == 0  # the epoch's final token is only ever a label
    assert np.all(np.delete(counts, stream_last) == 1)


def test_more_samples_than_an_epoch_start_new_epochs(tmp_path):
    lengths = np.random.default_rng(3).integers(1, 20, size=25)
    lengths[-1] += (2 - lengths.sum()) % 3  # 2 epochs then hold exactly (2 * tokens - 1) / 3 samples
    shard = write_shard(tmp_path / "m", lengths)
    tokens = int(lengths.sum())
    ds = GPTDataset(shard, range(len(shard)), num_samples=(2 * tokens - 1) // 3, seq_len=3, seed=0)
    assert len(ds.index["doc_idx"]) == 2 * len(shard)
    np.testing.assert_array_equal(np.bincount(ds.index["doc_idx"]), np.full(len(shard), 2))
    counts = np.bincount(np.concatenate([ds[i][:-1] for i in range(len(ds))]), minlength=tokens)
    stream_last = shard[int(ds.index["doc_idx"][-1])][-1]
    assert counts[stream_last] == 1
    assert np.all(np.delete(counts, stream_last) == 2)


def test_index_is_cached_and_keyed_by_every_input(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "c", np.arange(1, 30))
    first = GPTDataset(shard, range(len(shard)), 20, 8, seed=1)
    cache = tmp_path / "index-cache"
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and sum(f.endswith(".npy") for f in files) == 3
    assert isinstance(first.index["sample_idx"], np.memmap)

    def no_build(*args):
        raise AssertionError("rebuilt a cached index")

    monkeypatch.setattr(dataset_module, "build_index", no_build)
    again = GPTDataset(shard, range(len(shard)), 20, 8, seed=1)
    assert again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again[3], first[3])
    monkeypatch.undo()
    variants = [
        GPTDataset(shard, range(len(shard)), 20, 8, seed=2),
        GPTDataset(shard, range(len(shard)), 21, 8, seed=1),
        GPTDataset(shard, range(len(shard)), 20, 9, seed=1),
        GPTDataset(shard, range(1, len(shard)), 20, 8, seed=1),
    ]
    assert len({first.fingerprint, *(v.fingerprint for v in variants)}) == 5
    assert len(os.listdir(cache)) == 4 * 5


def test_fingerprint_survives_moving_the_data_but_not_changing_it(tmp_path):
    shard = write_shard(tmp_path / "a", [5, 6, 7])
    moved_dir = tmp_path / "moved"
    moved_dir.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{shard.prefix}{suffix}", moved_dir / f"a{suffix}")
    moved = MMapIndexedDataset(moved_dir / "a")
    changed = write_shard(tmp_path / "b", [5, 7, 6])
    fingerprint = GPTDataset(shard, range(3), 3, 4, 1).fingerprint
    assert GPTDataset(moved, range(3), 3, 4, 1).fingerprint == fingerprint
    assert GPTDataset(changed, range(3), 3, 4, 1).fingerprint != fingerprint


def test_interrupted_cache_write_is_rebuilt(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "i", np.arange(1, 20))
    real_save = np.save
    calls = []

    def failing_save(f, array):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(f, array)

    monkeypatch.setattr(dataset_module.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        GPTDataset(shard, range(len(shard)), 10, 4, 0)
    monkeypatch.undo()
    cache = tmp_path / "index-cache"
    assert not [f for f in os.listdir(cache) if f.endswith((".json", ".tmp"))]
    ds = GPTDataset(shard, range(len(shard)), 10, 4, 0)
    stream = stream_of(shard, ds.index["doc_idx"])
    j = int(ds.index["shuffle_idx"][0])
    np.testing.assert_array_equal(ds[0], stream[j * 4 : j * 4 + 5])


@pytest.mark.parametrize("weights", [[0.5, 0.5], [3, 1], [0.7, 0.2, 0.1], [1, 1e-3]])
def test_blend_schedule_tracks_weights_and_is_chunk_independent(weights, monkeypatch):
    n = 5000
    schedule = build_blend_schedule(weights, n)
    which, k = schedule["dataset_index"], schedule["dataset_sample_index"]
    w = np.asarray(weights) / sum(weights)
    seen = np.zeros(len(w), dtype=np.int64)
    for i in range(n):
        d = which[i]
        assert k[i] == seen[d]  # each dataset's samples are taken in order, none skipped
        seen[d] += 1
        assert np.all(np.abs(seen - w * (i + 1)) <= (len(w) + 1) / 2)
    monkeypatch.setattr(sample_index, "_BLEND_CHUNK", 7)
    small = build_blend_schedule(weights, n)
    np.testing.assert_array_equal(small["dataset_index"], which)
    np.testing.assert_array_equal(small["dataset_sample_index"], k)


def test_split_ranges_are_adjacent_and_cover_everything():
    fractions = DataConfig(split="969,30,1").split_fractions()
    ranges = [split_range(1000, fractions, i) for i in range(3)]
    assert ranges == [range(0, 969), range(969, 999), range(999, 1000)]
    assert split_range(7, DataConfig(split="1/1/1").split_fractions(), 2) == range(5, 7)
    assert DataConfig(split="100").split_fractions() == [1.0, 0.0, 0.0]


def test_build_datasets_splits_by_document_range(tmp_path):
    lengths = np.random.default_rng(4).integers(5, 30, size=100)
    shard = write_shard(tmp_path / "d", lengths)
    cfg = DataConfig(train_paths=[shard.prefix], split="8,1,1", seed=9)
    out = build_datasets(cfg, seq_len=8, num_samples={"train": 40, "valid": 10, "test": 0})
    assert out["test"] is None
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for split, documents in (("train", range(0, 80)), ("valid", range(80, 90))):
        ds = out[split]
        assert len(ds) >= {"train": 40, "valid": 10}[split]
        tokens = np.concatenate([ds[i] for i in range(len(ds))])
        assert tokens.min() >= bounds[documents.start] and tokens.max() < bounds[documents.stop]
    empty_valid = build_datasets(
        DataConfig(train_paths=[shard.prefix], split="1,0,0"), seq_len=8, num_samples={"train": 4, "valid": 4}
    )
    assert empty_valid["valid"] is None and empty_valid["train"] is not None


def test_build_datasets_blends_and_uses_separate_split_paths(tmp_path):
    a = write_shard(tmp_path / "a", np.full(50, 20))  # tokens 0..999
    b = write_shard(tmp_path / "b", np.full(50, 20))
    v = write_shard(tmp_path / "v", np.full(10, 20))
    cfg = DataConfig(
        train_paths=[a.prefix, b.prefix], train_weights=[3, 1], valid_paths=[v.prefix], test_paths=[v.prefix]
    )
    out = build_datasets(cfg, seq_len=10, num_samples={"train": 400, "valid": 5, "test": 5})
    train = out["train"]
    assert isinstance(train, BlendedDataset) and len(train) == 400
    which = np.asarray(train.schedule["dataset_index"])
    assert abs(np.mean(which == 0) - 0.75) < 0.01
    for i in (0, 1, 2, 3, 399):
        d, k = int(which[i]), int(train.schedule["dataset_sample_index"][i])
        np.testing.assert_array_equal(train[i], train.datasets[d][k])
    # Separate valid/test paths: the train shards are used whole (no split).
    assert all(d.index["doc_idx"].max() == 49 for d in train.datasets)
    assert out["valid"].shard.prefix == v.prefix
    reweighted = build_datasets(
        DataConfig(
            train_paths=[a.prefix, b.prefix],
            train_weights=[1, 1],
            valid_paths=[v.prefix],
            test_paths=[v.prefix],
        ),
        seq_len=10,
        num_samples={"train": 400},
    )
    assert reweighted["train"].fingerprint != train.fingerprint
    with pytest.raises(IndexError):
        train[400]


def test_default_weights_follow_token_counts(tmp_path):
    big = write_shard(tmp_path / "big", np.full(30, 30))
    small = write_shard(tmp_path / "small", np.full(10, 30))
    cfg = DataConfig(train_paths=[big.prefix, small.prefix], split="1,0,0", cache_dir=str(tmp_path / "cache"))
    train = build_datasets(cfg, 16, {"train": 100})["train"]
    assert train.weights == pytest.approx([0.75, 0.25])
    description = json.loads(next((tmp_path / "cache").glob("blend_*.json")).read_text())
    assert description["num_samples"] == 100


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: {"train_paths": [f"{d}/x"]}, r"data.train_paths: .*/x.bin does not exist"),
        (lambda d: {"valid_paths": [f"{d}/s.bin"]}, "without .bin/.idx"),
        (lambda d: {"train_weights": [1.0, 2.0]}, "2 entries for 1 train_paths"),
        (lambda d: {"train_weights": [0.0]}, "positive"),
        (lambda d: {"split": "90,x,10"}, "data.split"),
        (lambda d: {"split": "1,2,3,4"}, "data.split"),
        (lambda d: {"seed": -1}, "data.seed"),
        (lambda d: {"tokenizer": f"{d}/missing.json"}, "data.tokenizer"),
    ],
)
def test_config_validation_names_the_field(tmp_path, change, message):
    cfg = DataConfig(train_paths=[write_shard(tmp_path / "s", [3, 4]).prefix])
    cfg.validate()
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, **change(tmp_path)).validate()


def _rank_worker(rank, world, store, prefix, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    builds = []
    real_build = dataset_module.build_index
    dataset_module.build_index = lambda *args: builds.append(rank) or real_build(*args)
    ds = GPTDataset(MMapIndexedDataset(prefix), range(20), 30, 8, seed=3)
    np.save(os.path.join(out_dir, f"samples{rank}.npy"), np.stack([ds[i] for i in range(len(ds))]))
    np.save(os.path.join(out_dir, f"builds{rank}.npy"), np.array(builds, dtype=np.int64))
    dist.destroy_process_group()


def test_one_rank_builds_while_the_others_wait(tmp_path):
    shard = write_shard(tmp_path / "dist", np.arange(1, 21))
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_worker, args=(r, 2, tmp_path / "store", shard.prefix, tmp_path))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert np.load(tmp_path / "builds0.npy").tolist() == [0]
    assert np.load(tmp_path / "builds1.npy").tolist() == []
    np.testing.assert_array_equal(np.load(tmp_path / "samples0.npy"), np.load(tmp_path / "samples1.npy"))


def test_preshuffled_order_reads_items_in_file_order_then_repeats(tmp_path):
    seq_len = 8
    write_shard(str(tmp_path / "pre"), [seq_len + 1] * 5)
    cfg = DataConfig(train_paths=[str(tmp_path / "pre")], split="1", sample_order="preshuffled")
    train = build_datasets(cfg, seq_len, {"train": 7})["train"]
    assert len(train) == 10  # two whole epochs cover 7 samples
    for i in range(10):
        expected = np.arange(9) + (i % 5) * 9  # item i's tokens are its positions in the file
        assert np.array_equal(train[i], expected)
    with pytest.raises(IndexError):
        train[10]
    other = build_datasets(dataclasses.replace(cfg, sample_order="gpt-neox"), seq_len, {"train": 7})["train"]
    assert other.fingerprint != train.fingerprint


def test_preshuffled_order_rejects_items_of_the_wrong_length(tmp_path):
    write_shard(str(tmp_path / "pre"), [9, 9, 7, 9])
    cfg = DataConfig(train_paths=[str(tmp_path / "pre")], split="1", sample_order="preshuffled")
    with pytest.raises(ValueError, match="item 2 has 7"):
        build_datasets(cfg, 8, {"train": 3})
    with pytest.raises(ValueError, match="sample_order"):
        DataConfig(train_paths=[str(tmp_path / "pre")], sample_order="random").validate()


def test_more_samples_within_the_same_epochs_keep_the_order_and_resume(tmp_path):
    from data.sampler import PretrainingSampler

    shard = write_shard(tmp_path / "o", np.random.default_rng(4).integers(5, 30, size=40))
    one_epoch = (int(shard.sizes.sum()) - 1) // 8
    few, more = (GPTDataset(shard, range(len(shard)), n, seq_len=8, seed=1) for n in (10, one_epoch))
    past = GPTDataset(shard, range(len(shard)), one_epoch + 1, seq_len=8, seed=1)
    assert few.fingerprint != more.fingerprint and few.order_fingerprint == more.order_fingerprint
    assert past.order_fingerprint != few.order_fingerprint
    for i in range(10):
        np.testing.assert_array_equal(few[i], more[i])
    saved = PretrainingSampler(10, 4, 2, 0, 1, few.fingerprint, order_fingerprint=few.order_fingerprint)
    extended = PretrainingSampler(20, 0, 2, 0, 1, more.fingerprint, order_fingerprint=more.order_fingerprint)
    extended.load_state_dict(saved.state_dict())  # train_steps raised within the epoch: accepted
    assert extended.consumed_samples == 4
    reshuffled = PretrainingSampler(
        20, 0, 2, 0, 1, past.fingerprint, order_fingerprint=past.order_fingerprint
    )
    with pytest.raises(ValueError, match="train_steps past an epoch"):
        reshuffled.load_state_dict(saved.state_dict())
    with pytest.warns(UserWarning, match="reshuffled index"):
        reshuffled.load_state_dict(saved.state_dict(), allow_data_change=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "torn_marker"])
def test_a_damaged_index_cache_is_named_with_what_to_delete(tmp_path, damage):
    shard = write_shard(tmp_path / "c", np.full(20, 29))
    GPTDataset(shard, range(len(shard)), 30, seq_len=8, seed=1)
    cache = tmp_path / "index-cache"
    victim = next(cache.glob("*_shuffle_idx.npy")) if damage != "torn_marker" else next(cache.glob("*.json"))
    if damage == "truncated":
        os.truncate(victim, victim.stat().st_size - 20)
    else:
        victim.write_bytes(victim.read_bytes()[:15] if damage == "torn_marker" else b"garbage")
    with pytest.raises(ValueError, match=f"index cache {cache}/.*unreadable .*; delete {cache}/c_"):
        GPTDataset(shard, range(len(shard)), 30, seq_len=8, seed=1)
