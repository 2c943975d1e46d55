"""benchmarks/gpu_check.sh: its CPU smoke mode passes every check; without a GPU the full check
says so and fails."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = (
    "device",
    "train tiny K=4 ZeRO-3 bf16 dense+sparse",
    "train tiny K=4 flash attention only",
    "export",
    "eval forward sparse vs dense",
    "decode step vs transformers",
    "self-speculative decoding",
)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smoke_mode_passes_every_check():
    done = run("--smoke")
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP "))]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [line.split(":")[0] for line in lines] == [f"PASS {name}" for name in CHECKS]
    assert "gpu_check: 7 passed, 0 failed" in done.stdout
    train = next(line for line in lines if "dense+sparse" in line)
    assert "sparse / dense x" in train and "planned" in train


def test_the_full_check_fails_without_a_gpu():
    done = run()
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL device: no GPU")
