"""`adaponder-quickstart` end to end, shortened: build the data, train on 2 ZeRO-3 ranks through the
`deepspeed` launcher, get preempted by SIGUSR1, resume by itself, export, evaluate, generate."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, environment

from launcher.quickstart import EVAL_THRESHOLDS, eval_arguments
from training import evaluate
from training.config import read_config


@pytest.mark.slow
def test_quickstart_shows_the_whole_life_of_a_run(tmp_path):
    run = tmp_path / "quickstart"
    command = [
        sys.executable, "-m", "launcher.quickstart", "--corpus-bytes", "300000", "--interrupt-at", "3",
        "--sample-tokens", "8", f"run_dir={run}", f"data.train_paths=[{run}/data/stdlib_text_document]",
        f"data.tokenizer={run}/data/tokenizer", "train_steps=6", "logging.log_interval=1",
        "logging.eval_interval=6", "model.overrides.num_hidden_layers=2", "data.split=90,10,0",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    # Preempted after step 3 or 4, checkpointed, then resumed by the same command.
    assert "preempting the run: SIGUSR1 to its 2 ranks" in out
    assert "== run stopped by signal (SIGUSR1) at step" in out
    assert "resumed from" in out and "(full state)" in out
    assert "train loss over both launches" in out
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("finished", 6)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (run / "hf").iterdir()}
    assert "exported step 6" in out
    # adaponder-eval on the export: the learned point's table row, and its report on disk.
    assert "evaluation: adaponder-eval" in out and "| learned | 0.0001 |" in out
    points = json.loads((run / "eval" / "eval.json").read_text())["points"]
    assert points[0]["tokens"] > 0
    # Its quality-against-compute plot is a curve: the trained tau and a sweep, and fixed pruning.
    learned = [p for p in points if p["policy"] == "learned"]
    assert len(learned) == 1 + len(EVAL_THRESHOLDS.split(",")) and len(points) == 3 * len(learned)
    assert (run / "eval" / "quality_vs_compute.png").is_file() and (
        run / "eval" / "nll_by_passes.png"
    ).is_file()
    # The generated sample shows each token's passes, then their mean.
    sample = out[out.index("sample (greedy") :].splitlines()[1]
    assert sample.startswith("def __init__(self") and sample.count("[") >= 1
    assert "passes per token on average" in out
    assert f"run directory     {run.resolve()}" in out and str((run / "hf").resolve()) in out
    assert (run / "monitor" / "csv" / "train_lm_loss.csv").is_file()


def test_quickstart_evaluation_sweeps_tau_against_fixed_pruning(tmp_path):
    """More than one point per curve: a single dot says nothing a table does not."""
    cfg = read_config(REPO / "configs" / "quickstart.yaml", [])
    args = evaluate.build_parser().parse_args(eval_arguments(tmp_path / "hf", cfg, tmp_path / "eval"))
    taus = [float(t) for t in args.sweep_threshold.split(",")]
    assert len(taus) >= 3 and len(set(taus)) == len(taus) and all(0 < t < 1 for t in taus)
    assert args.policies == "uniform,geometric"
    assert (args.data, args.split, args.split_name) == (cfg.data.train_paths[0], cfg.data.split, "valid")
