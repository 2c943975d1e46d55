"""The host-sync budget: a training forward + backward, an evaluation forward and a decoded token at
batch 1 each make at most K device-to-host synchronisations (one per pass), and the trainer's
metering makes none per micro-batch. Counted through TorchDispatchMode on CPU: every op whose
result size or value the host must wait for."""

import collections

import pytest
import torch
from helpers import VOCAB, random_halting_model
from torch.utils._python_dispatch import TorchDispatchMode

from model.inference import AdaPonderCache
from training.metrics import TrainMeter

# Ops that read device data on the host: a scalar read, or an output whose size depends on values.
_SYNCING = {
    "_local_scalar_dense",
    "is_nonzero",
    "nonzero",
    "unique_consecutive",
    "_unique2",
    "unique_dim",
    "masked_select",
    "bincount",
    "equal",
}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _SYNCING:
            self.ops[name] += 1
        elif (
            name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and "output_size" not in kwargs
        ):
            self.ops[name] += 1
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.ops["index (boolean)"] += 1
        elif name == "_to_copy" and str(kwargs.get("device")) == "cpu":  # an explicit copy to the host
            self.ops["to host"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(seed))


def test_a_packed_training_step_syncs_at_most_once_per_pass():
    model = random_halting_model(seed=11).train()
    ids = batch()
    with SyncCounter() as syncs:
        out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1, dense=False)
        out.loss.backward()
    assert len(set(out.passes.flatten().tolist())) == 4, "tokens must halt after every pass"
    assert syncs.total <= model.config.num_passes, dict(syncs.ops)


@pytest.mark.parametrize("padded", [False, True])
def test_an_eval_forward_syncs_at_most_once_per_pass(padded):
    model = random_halting_model(seed=12).eval()
    ids = batch(2)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    with torch.no_grad(), SyncCounter() as syncs:
        out = model(ids, attention_mask=mask if padded else None)
    assert 1.5 < float(out.mean_passes) < 3.5
    assert syncs.total <= model.config.num_passes, dict(syncs.ops)


def test_a_decoded_token_at_batch_one_syncs_at_most_once_per_pass():
    model = random_halting_model(seed=13).eval()
    ids = batch(3)[:1]
    cache = AdaPonderCache(model.config, max_length=16)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, 16):
            with SyncCounter() as syncs:
                model(ids[:, t : t + 1], cache=cache, output_halting=False)
            assert syncs.total <= model.config.num_passes, (t, dict(syncs.ops))
    assert len(set(cache.passes[0, 4:].tolist())) > 1


def test_metering_a_micro_batch_reads_nothing_on_the_host():
    model = random_halting_model(seed=14).train()
    ids = batch(4)
    out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1, dense=False)
    meter = TrainMeter(model.config.num_passes, torch.device("cpu"), num_gates=len(model.ponder_gates))
    with SyncCounter() as syncs:
        meter.add_micro_batch(out)
    assert syncs.total == 0, dict(syncs.ops)
