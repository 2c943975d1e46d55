"""PretrainingSampler and the DataLoader: rank slicing, exact resume, fingerprint checks."""

import pickle

import numpy as np
import pytest
import torch

from data import build_datasets
from data.config import DataConfig
from data.dataset import GPTDataset
from data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder
from data.loader import build_dataloader
from data.sampler import PretrainingSampler


def global_steps(num_samples, consumed, micro, dp, fingerprint="fp"):
    """Each step's indices over all ranks, rank 0 first."""
    per_rank = [list(PretrainingSampler(num_samples, consumed, micro, r, dp, fingerprint)) for r in range(dp)]
    return [sum((steps[i] for steps in per_rank), []) for i in range(len(per_rank[0]))]


def test_each_rank_gets_its_slice_of_every_global_batch():
    assert list(PretrainingSampler(20, 0, 3, 0, 2, "fp")) == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    assert list(PretrainingSampler(20, 0, 3, 1, 2, "fp")) == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]
    assert list(PretrainingSampler(20, 5, 3, 1, 2, "fp")) == [[8, 9, 10], [14, 15, 16]]


def test_stops_at_the_end_without_wrapping():
    sampler = PretrainingSampler(23, 0, 2, 1, 3, "fp")
    steps = list(sampler)
    assert len(steps) == len(sampler) == 3
    assert max(max(s) for s in steps) < 18
    assert list(PretrainingSampler(23, 23, 2, 0, 3, "fp")) == []
    with pytest.raises(ValueError, match="used up its data"):
        PretrainingSampler(23, 24, 2, 0, 3, "fp")


@pytest.mark.parametrize(("micro", "dp", "rank"), [(0, 1, 0), (1, 0, 0), (2, 2, 2), (2, 2, -1)])
def test_bad_arguments(micro, dp, rank):
    with pytest.raises(ValueError):
        PretrainingSampler(10, 0, micro, rank, dp, "fp")


@pytest.mark.parametrize("seed", range(5))
def test_resume_with_other_ranks_and_micro_batch_sees_the_same_order(seed):
    rng = np.random.default_rng(seed)
    num_samples = 997
    micro, dp = (int(x) for x in rng.integers(1, 5, size=2))
    uninterrupted = sum(global_steps(num_samples, 0, micro, dp), [])
    assert uninterrupted == list(range(len(uninterrupted)))

    consumed = int(rng.integers(0, len(uninterrupted) // (micro * dp))) * micro * dp
    state = PretrainingSampler(num_samples, 0, micro, 0, dp, "fp").state_dict(consumed_samples=consumed)
    new_micro, new_dp = (int(x) for x in rng.integers(1, 6, size=2))
    resumed = []
    for rank in range(new_dp):
        sampler = PretrainingSampler(num_samples, 0, new_micro, rank, new_dp, "fp")
        sampler.load_state_dict(state)
        resumed.append(list(sampler))
    order = [i for step in range(len(resumed[0])) for rank_steps in resumed for i in rank_steps[step]]
    assert order == list(range(consumed, consumed + len(order)))
    assert num_samples - consumed - len(order) < new_micro * new_dp


def test_fingerprint_mismatch_is_an_error_unless_allowed():
    state = PretrainingSampler(100, 0, 2, 0, 1, "old").state_dict(consumed_samples=40)
    assert state == {
        "consumed_samples": 40,
        "fingerprint": "old",
        "order_fingerprint": None,
        "start_sample": 0,
    }
    sampler = PretrainingSampler(100, 0, 2, 0, 1, "new")
    with pytest.raises(ValueError, match="fingerprint"):
        sampler.load_state_dict(state)
    assert sampler.consumed_samples == 0
    with pytest.warns(UserWarning, match="fingerprint"):
        sampler.load_state_dict(state, allow_data_change=True)
    assert next(iter(sampler)) == [40, 41]
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"consumed_samples": 3})
    with pytest.raises(ValueError, match="used up"):
        sampler.load_state_dict({"consumed_samples": 101, "fingerprint": "new"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("loader") / "shard"
    lengths = np.random.default_rng(0).integers(1, 50, size=60)
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_documents(np.arange(lengths.sum()) % 50_000, lengths)
        builder.finalize()
    return GPTDataset(MMapIndexedDataset(prefix), range(60), num_samples=100, seq_len=16, seed=11)


def run(dataset, consumed, micro, dp, num_workers=0):
    """The global stream of samples, step by step, as dp ranks would load them."""
    loaders = [
        iter(
            build_dataloader(
                dataset, PretrainingSampler(100, consumed, micro, r, dp, dataset.fingerprint), num_workers
            )
        )
        for r in range(dp)
    ]
    steps = []
    for batches in zip(*loaders):
        for b in batches:
            assert b.dtype == torch.int64 and b.shape == (micro, 17)
        steps.append(torch.cat(batches))
    return torch.cat(steps)


@pytest.mark.parametrize("seed", range(3))
def test_resumed_loading_yields_the_uninterrupted_samples(dataset, seed):
    uninterrupted = run(dataset, 0, micro=2, dp=2)
    assert len(uninterrupted) == 100
    # Stop after a random number of 2 x 2 steps; resume with other ranks and micro-batch.
    rng = np.random.default_rng(seed)
    consumed = 4 * int(rng.integers(0, 25))
    micro, dp = (int(x) for x in rng.integers(1, 4, size=2))
    resumed = run(dataset, consumed, micro, dp)
    assert len(resumed) == (100 - consumed) // (micro * dp) * micro * dp
    torch.testing.assert_close(resumed, uninterrupted[consumed : consumed + len(resumed)], rtol=0, atol=0)


def test_worker_processes_load_the_same_batches(dataset):
    torch.testing.assert_close(run(dataset, 8, 4, 1, num_workers=1), run(dataset, 8, 4, 1), rtol=0, atol=0)


def test_dataset_pickles_by_reference(dataset):
    blob = pickle.dumps(dataset)
    assert len(blob) < 4096
    np.testing.assert_array_equal(pickle.loads(blob)[42], dataset[42])


def preshuffled_shard(path, num_items: int, seq_len: int) -> str:
    """Pythia-style pre-shuffled shard: item i is one ``seq_len + 1``-token sample whose tokens all
    encode i (i x 8 + position), so a batch names the items it came from."""
    with MMapIndexedDatasetBuilder(path, np.int32) as builder:
        for i in range(num_items):
            builder.add_item(i * 8 + np.arange(seq_len + 1))
            builder.end_document()
        builder.finalize()
    return str(path)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_continued_after_pythia_step_n_reads_items_from_n_x_1024(tmp_path, ranks):
    seq_len, pythia_step, micro = 4, 2, 3
    prefix = preshuffled_shard(tmp_path / "pile", 2 * 1024 + 64, seq_len)
    cfg = DataConfig(
        train_paths=[prefix], split="1", sample_order="preshuffled", start_after_pythia_step=pythia_step
    )
    cfg.validate()
    assert cfg.first_sample() == pythia_step * 1024
    run_samples = 2 * micro * ranks  # two steps
    train = build_datasets(cfg, seq_len, {"train": cfg.first_sample() + run_samples})["train"]
    samplers = [
        PretrainingSampler(run_samples, 0, micro, r, ranks, train.fingerprint, cfg.first_sample())
        for r in range(ranks)
    ]
    first_batches = [next(iter(build_dataloader(train, s, num_workers=0))) for s in samplers]
    for rank, batch in enumerate(first_batches):
        items = 2048 + rank * micro + np.arange(micro)  # Pythia's step 2 begins at item 2048
        expected = items[:, None] * 8 + np.arange(seq_len + 1)
        np.testing.assert_array_equal(batch.numpy(), expected)


def test_start_sample_is_saved_and_a_resume_from_another_start_is_an_error():
    sampler = PretrainingSampler(40, 0, 2, 1, 2, "fp", start_sample=100)
    assert next(iter(sampler)) == [102, 103]
    state = sampler.state_dict(consumed_samples=8)
    assert state["start_sample"] == 100
    resumed = PretrainingSampler(40, 0, 2, 0, 1, "fp", start_sample=100)
    resumed.load_state_dict(state)
    assert next(iter(resumed)) == [108, 109]  # the run's 9th sample is global sample 108
    with pytest.raises(ValueError, match="started at sample 100"):
        PretrainingSampler(40, 0, 2, 0, 1, "fp", start_sample=0).load_state_dict(state)


def test_pythia_start_needs_the_preshuffled_order_and_excludes_start_sample():
    with pytest.raises(ValueError, match="sample_order: preshuffled"):
        DataConfig(start_after_pythia_step=3).validate()
    with pytest.raises(ValueError, match="at most one"):
        DataConfig(sample_order="preshuffled", start_after_pythia_step=3, start_sample=5).validate()
    with pytest.raises(ValueError, match="data.start_sample"):
        DataConfig(start_sample=-1).validate()
