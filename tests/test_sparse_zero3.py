"""The sparse training step under real DeepSpeed ZeRO-3 on 2 CPU ranks: one rank's tokens all halt
after pass 1, the other's never do; the run completes (no rank waits for a module call the other
skipped) and matches the dense step."""

import json
import subprocess
import sys

import torch
from helpers import REPO, environment

from training.distributed import free_port


def run(tmp_path) -> dict:
    out = tmp_path / "results.json"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port()), str(REPO / "tests" / "zero3_sparse_worker.py"), str(out)),
    ]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())


def test_sparse_zero3_step_with_one_rank_fully_halted_matches_dense(tmp_path):
    results = run(tmp_path)
    dense, sparse = results["dense"], results["sparse"]
    assert sparse["passes"] == dense["passes"] == [[1.0, 4.0]] * 3
    torch.testing.assert_close(
        torch.tensor(sparse["losses"]), torch.tensor(dense["losses"]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(sparse["grad_norms"]), torch.tensor(dense["grad_norms"]), atol=1e-5, rtol=1e-5
    )
    for name, values in dense["final"].items():
        torch.testing.assert_close(
            torch.tensor(sparse["final"][name]), torch.tensor(values), atol=1e-5, rtol=1e-5
        )
