"""`adaponder-quickstart` end to end, shortened: build the data, train on 2 ZeRO-3 ranks through the
`deepspeed` launcher, get preempted by SIGUSR1, resume by itself, export, evaluate, generate."""

import json
import subprocess
import sys

import pytest
from test_training_run import REPO, environment


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
    assert json.loads((run / "eval" / "eval.json").read_text())["points"][0]["tokens"] > 0
    # The generated sample shows each token's passes, then their mean.
    sample = out[out.index("sample (greedy") :].splitlines()[1]
    assert sample.startswith("def __init__(self") and sample.count("[") >= 1
    assert "passes per token on average" in out
    assert f"run directory     {run.resolve()}" in out and str((run / "hf").resolve()) in out
    assert (run / "monitor" / "csv" / "train_lm_loss.csv").is_file()
