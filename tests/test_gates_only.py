"""Gates-only phase on real 2-rank ZeRO-3 (CPU, gloo): the backbone's weight gradients are neither
computed nor reduced, the norm counts only the gates, the gates learn through the later passes, and
afterwards everything trains. The rank's side is tests/gates_only_worker.py."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, environment

from training.distributed import free_port


# Checkpointing recomputes the same modules in backward: opt-in beside the plain run.
@pytest.fixture(scope="module", params=["plain", pytest.param("checkpointing", marks=pytest.mark.optin)])
def report(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("gates_only") / "report.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "gates_only_worker.py"),
        str(out),
        request.param,
    ]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())["steps"]


def test_gates_only_step_reduces_and_changes_only_the_gates(report):
    step = report[0]
    assert step["gates_only"]
    gates = step["trained_in_reference"]
    assert gates and all(name.startswith("ponder_gates.") for name in gates)
    assert step["reduced"] == gates  # no backbone gradient reached ZeRO-3's reduction
    assert step["changed"] == gates  # the backbone is bit-identical after the step
    assert step["frozen_grads"] == []
    # The norm ZeRO-3 clips with is the gates' own.
    assert step["grad_norm"] == pytest.approx(step["expected_grad_norm"], rel=1e-5)
    assert step["max_grad_error"] < 1e-6


def test_every_gate_learns_through_the_later_passes(report):
    step = report[0]
    assert {1, 2, 3, 4} <= set(step["passes"])  # tokens halt after every pass
    # Gate 0's output only reaches the loss through passes 1..3 of the frozen backbone.
    assert {"ponder_gates.0.dense_in.weight", "ponder_gates.2.dense_out.weight"} <= set(
        step["nonzero_gate_grads"]
    )


def test_after_the_phase_everything_trains(report):
    step = report[1]
    assert not step["gates_only"]
    assert step["reduced"] == step["trained_in_reference"] == step["changed"]
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in step["changed"]
    assert step["grad_norm"] == pytest.approx(step["expected_grad_norm"], rel=1e-5)
    assert step["max_grad_error"] < 1e-6
