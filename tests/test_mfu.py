"""MFU and TFLOP/s count the passes actually run: sparse training skips halted tokens' passes."""

import types

import pytest
import torch

from training import metrics
from training.metrics import TrainMeter


def micro_batch_output(dense_flops: float, adaptive_flops: float):
    """What the model returns for one micro-batch: 2 x 3 tokens, half of them halted after pass 1."""
    return types.SimpleNamespace(
        lm_loss=torch.tensor(2.0),
        ponder_loss=torch.tensor(0.1),
        passes=torch.tensor([[1, 4, 1], [4, 1, 4]]),
        flops={"dense_total": torch.tensor(dense_flops), "total": torch.tensor(adaptive_flops)},
        gates=torch.full((3, 2, 3), 0.5),
    )


@pytest.mark.parametrize("sparse", [True, False])
def test_tflops_count_the_passes_run(monkeypatch, sparse):
    clock = iter([100.0, 102.0])  # the meter's clock: started, then reduced 2 s later
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = TrainMeter(4, torch.device("cpu"), num_gates=3, sparse=sparse)
    meter.add_micro_batch(micro_batch_output(dense_flops=4e12, adaptive_flops=2.5e12))
    result = meter.reduce()
    run = 2.5e12 if sparse else 4e12  # forward FLOPs computed; x3 for forward + backward
    assert result["tflops_per_rank"] == pytest.approx(3 * run / 2.0 / 1e12)
    assert result["adaptive_flops_fraction"] == pytest.approx(2.5 / 4)


def test_carried_flops_are_the_ones_run(monkeypatch):
    """A checkpoint's untimed interval is taken out of throughput in the same currency."""
    clock = iter([0.0, 0.0, 1.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    saved = TrainMeter(4, torch.device("cpu"), num_gates=3, sparse=True)
    saved._sums[:6] = torch.tensor([2.0, 0.1, 1.0, 6.0, 4e12, 2.5e12], dtype=torch.float64)
    meter = TrainMeter(4, torch.device("cpu"), num_gates=3, sparse=True)
    meter.load_state_dict([saved.state_dict()], 0, 1)
    assert meter.reduce()["tflops_per_rank"] == 0.0
