"""A run's record (summary.json) survives resumes and re-runs, and is strict JSON (1-rank CPU runs)."""

import json

from helpers import make_config, run_dir, train

RUN = {"train_steps": 4, "checkpoint__interval": 2, "logging__eval_interval": 2}


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_resumed_and_rerun_finished_runs_keep_their_record_in_strict_json(tmp_path, train_shards):
    config = make_config(tmp_path, train_shards, "record", **RUN)
    summary_path = run_dir(config) / "summary.json"
    train(config, "exit_at_step=2", nproc=1)
    first_launch = strict_json(summary_path.read_text())  # NaN for pass counts no token used: null
    assert first_launch["eval"]["nll_by_passes"][0] is None

    train(config, nproc=1)  # resumes at step 2 and finishes
    finished_text = summary_path.read_text()
    finished = strict_json(finished_text)
    assert finished["status"] == "finished" and finished["step"] == 4
    assert finished["first_loss"] == first_launch["first_loss"]  # the run's, not the resumed launch's
    assert finished["last_loss"] != first_launch["last_loss"]

    result = train(config, nproc=1)  # nothing left to train
    assert "== run already complete at step 4/4" in result.stdout
    assert f"validation: loss {finished['eval']['lm_loss']:.4f}" in result.stdout
    assert summary_path.read_text() == finished_text  # the record is not overwritten
