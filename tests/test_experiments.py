"""The study (experiments/) at toy size: it runs, stops, resumes, does not redo work, and reports.

Also the stage-1 option it compares: `ponder.halt_during_stage1: false` runs every token through all
passes while the ponder loss is off, whatever the gates say.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, environment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.arms import SMOKE, arms, run_name


def study(tmp_path: Path, *args: str, work: str = "work", out: str = "out", code: int = 0):
    dirs = ["--smoke", "--work", str(tmp_path / work), "--out", str(tmp_path / out)]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.study", *args, *dirs],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_smoke_study_stops_resumes_and_reports(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    names = [run_name(arm, seed) for seed in SMOKE.seeds for arm in arms(SMOKE)]

    # An interrupted study: one arm stopped halfway, the others not started.
    study(tmp_path, "run", "--arms", "adaponder", "--exit-at-step", "4")
    readme = (out / "README.md").read_text()
    assert "PARTIAL RESULTS" in readme
    assert "adaponder-s1 (stopped at step-00000004" in readme
    assert "vanilla-s1 (not started)" in readme

    # Rerun: the stopped run resumes from its checkpoint, the others train; everything is evaluated.
    first = study(tmp_path, "run")
    assert "adaponder-s1: trained and evaluated" in first.stdout
    log = (work / "logs" / "adaponder-s1.log").read_text()
    assert "at step 4" in log.split("====")[-1]  # the second invocation resumed
    assert json.loads((work / "runs" / "adaponder-s1" / "wall.json").read_text())["invocations"] == 2
    results = {n: json.loads((out / "results" / "by_run" / f"{n}.json").read_text()) for n in names}
    assert len({r["train_tokens"] for r in results.values()}) == 1  # same tokens for every arm
    assert all(r["train_steps"] == SMOKE.train_steps for r in results.values())
    for arm in arms(SMOKE):
        r = results[run_name(arm, SMOKE.seeds[0])]
        assert r["adaptive"] == arm.adaptive
        curve = r["training_curve"]
        assert [s for s, _ in curve["lm_loss"]] == list(range(1, SMOKE.train_steps + 1))
        assert all(1.0 <= v <= 4.0 for _, v in curve["mean_passes"])
        if arm.adaptive:
            assert [p["tau"] for p in r["tau_sweep"]] == sorted(SMOKE.taus)
            for point in r["tau_sweep"]:
                for policy in point["fixed_pruning"].values():
                    assert abs(policy["mean_passes"] - point["mean_passes"]) < 0.05
    readme = (out / "README.md").read_text()
    assert "PARTIAL" not in readme
    for arm in arms(SMOKE):
        assert f"| {arm.label} | 1 |" in readme
    stage1 = readme.split("### Stage 1")[1].split("###")[0]
    assert sum(line.startswith("| adaponder") for line in stage1.splitlines()) == 3
    for plot in ("ppl_vs_compute.png", "nll_by_passes.png", "training_passes.png"):
        assert (out / "results" / plot).read_bytes()[:4] == b"\x89PNG"
    assert len((out / "results" / "table.csv").read_text().splitlines()) == 1 + len(arms(SMOKE))

    # Again: nothing is retrained or re-evaluated.
    stamps = {n: (out / "results" / "by_run" / f"{n}.json").stat().st_mtime_ns for n in names}
    again = study(tmp_path, "run")
    assert again.stdout.count(": done") == len(names)
    assert stamps == {n: (out / "results" / "by_run" / f"{n}.json").stat().st_mtime_ns for n in names}
    assert json.loads((work / "runs" / "adaponder-s1" / "wall.json").read_text())["invocations"] == 2

    # A result written before results carried the training curve gets it from the run's logs.
    from experiments.study import Layout, backfill_training_curve

    layout = Layout(SMOKE, work, out)
    path = layout.result_file("adaponder-s1")
    full = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in full.items() if k != "training_curve"}))
    assert backfill_training_curve(layout, "adaponder-s1")
    assert json.loads(path.read_text()) == full
    assert not backfill_training_curve(layout, "adaponder-s1")


# Opt-in: a second smoke study and its rerun; the default suite checks that the study stops, resumes
# and reports, and tests/test_training_run.py that a stopped and resumed run equals an uninterrupted one.
@pytest.mark.optin
def test_a_rerun_from_scratch_reproduces_a_stopped_and_resumed_study(tmp_path):
    out = tmp_path / "out"
    study(tmp_path, "run", "--arms", "vanilla,adaponder", "--exit-at-step", "4")
    study(tmp_path, "run", "--arms", "vanilla,adaponder")
    # From scratch in a fresh work directory, uninterrupted: the same data bytes and the same
    # results as the study above, whose runs were stopped and resumed.
    study(tmp_path, "run", "--arms", "vanilla,adaponder", work="rerun", out="rerun/out")
    compared = study(tmp_path, "compare", "--rerun", str(tmp_path / "rerun"))
    assert "data: same bytes" in compared.stdout
    reproduction = json.loads((out / "results" / "reproduction.json").read_text())
    assert [r["run"] for r in reproduction["runs"]] == ["adaponder-s1", "vanilla-s1"]
    assert all(r["verdict"] == "same" for r in reproduction["runs"]), reproduction
    resumed = {r["run"]: (r["resumes_reference"], r["resumes_rerun"]) for r in reproduction["runs"]}
    assert resumed == {"adaponder-s1": (1, 0), "vanilla-s1": (1, 0)}
    assert "## Reproduction from scratch" in (out / "README.md").read_text()
    # A rerun that does not reproduce fails the command and says so in the report.
    rerun_result = tmp_path / "rerun" / "out" / "results" / "by_run" / "vanilla-s1.json"
    broken = json.loads(rerun_result.read_text())
    broken["learned"]["ppl"] *= 2
    rerun_result.write_text(json.dumps(broken))
    study(tmp_path, "compare", "--rerun", str(tmp_path / "rerun"), code=1)
    assert "the study does not reproduce" in (out / "README.md").read_text()


def test_only_the_full_study_in_its_own_work_directory_writes_the_committed_results(tmp_path):
    from experiments.study import EXPERIMENTS, layout_of, parse_args

    assert layout_of(parse_args(["status"])).out == EXPERIMENTS
    assert layout_of(parse_args(["status", "--pilot"])).out == EXPERIMENTS / "pilot"
    assert layout_of(parse_args(["status", "--scale", "pilot2"])).out == EXPERIMENTS / "pilot2"
    elsewhere = layout_of(parse_args(["run", "--scale", "pilot2", "--work", str(tmp_path)]))
    assert elsewhere.out == tmp_path / "out"
    rerun = layout_of(parse_args(["run", "--seeds", "1", "--work", str(tmp_path / "rerun")]))
    assert rerun.out == tmp_path / "rerun" / "out"
    assert layout_of(parse_args(["run", "--smoke"])).out == EXPERIMENTS / "work" / "smoke" / "out"
    chosen = layout_of(parse_args(["report", "--work", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert chosen.out == tmp_path / "o"


def test_reproduction_compares_every_number_but_timings(tmp_path):
    from experiments.reproduce import compare, numbers

    curve = {"training_curve": {"lm_loss": [[50, 4.0], [100, 3.5]]}, "train_wall_seconds": 3.0}
    assert numbers(curve) == {"training_curve.lm_loss.step 50": 4.0, "training_curve.lm_loss.step 100": 3.5}

    def result(arm: str, ppl: float, sweep: float, wall: float) -> dict:
        return {
            "arm": arm,
            "learned": {"ppl": ppl, "mean_passes": 3.0, "nll_by_passes": [None, 2.0]},
            "tau_sweep": [{"ppl": sweep}],
            "adaptive": True,
            "train_wall_seconds": wall,
        }

    def write(root: Path, runs: dict[str, dict], sha: str | None) -> Path:
        (root / "by_run").mkdir(parents=True)
        for name, r in runs.items():
            (root / "by_run" / f"{name}.json").write_text(json.dumps(r))
        (root / "corpus.json").write_text(json.dumps({"sha256": {"train.bin": sha}} if sha else {}))
        return root

    reference = write(
        tmp_path / "ref",
        {"a-s1": result("a", 100.0, 110.0, 5.0), "a-s2": result("a", 102.0, 111.0, 5.0)},
        "x",
    )
    same_but_slower = write(tmp_path / "same", {"a-s1": result("a", 100.0, 110.0, 9.0)}, "x")
    assert [r["verdict"] for r in compare(reference, same_but_slower)["runs"]] == ["same"]
    assert compare(reference, same_but_slower)["data"] == "same bytes"
    # A tau-sweep point off by 1e-3: not the same run, but within the seed spread (std 1.41 PPL).
    deep = write(tmp_path / "deep", {"a-s1": result("a", 100.0, 110.11, 5.0)}, "y")
    (run,) = compare(reference, deep)["runs"]
    assert (run["verdict"], run["at"]) == ("within the seed spread", "tau_sweep.0.ppl")
    assert compare(reference, deep)["data"] == "differs or not recorded"
    outside = write(tmp_path / "outside", {"a-s2": result("a", 99.0, 111.0, 5.0)}, None)
    assert [r["verdict"] for r in compare(reference, outside)["runs"]] == ["outside the seed spread"]
    stranger = write(tmp_path / "stranger", {"b-s1": result("b", 1.0, 1.0, 1.0)}, "x")
    with pytest.raises(ValueError, match="no counterpart"):
        compare(reference, stranger)


def _passes_by_step(tmp_path: Path, train_shards, halt_during_stage1: bool) -> dict[int, float]:
    prefix, tokenizer = train_shards
    run = tmp_path / f"hold-{halt_during_stage1}"
    config = {
        "run_dir": str(run),
        # Gates start closed (s ~ 2e-9 < tau): with halting on, every token stops after one pass.
        "model": {"preset": "tiny", "overrides": {"gate_bias_init": -20.0}},
        "data": {"train_paths": [prefix], "tokenizer": tokenizer, "split": "100,0,0", "num_workers": 0},
        "ponder": {"start": 1, "halt_during_stage1": halt_during_stage1},  # step 1: stage 1; step 2: not
        "checkpoint": {"interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "progress_bar": False},
        "seq_len": 32,
        "micro_batch_size": 4,
        "global_batch_size": 4,
        "train_steps": 2,
        "precision": "fp32",
        "deepspeed_config": "ds_configs/zero1.json",
    }
    path = tmp_path / f"hold-{halt_during_stage1}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "pretrain.py"), "--config", str(path)],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("ponder/mean_passes")}


# Opt-in: the smoke study trains the adaponder-hold arm that uses the option.
@pytest.mark.optin
def test_halting_held_off_during_stage1_only(tmp_path, train_shards):
    assert _passes_by_step(tmp_path, train_shards, halt_during_stage1=False) == {1: 4.0, 2: 1.0}
    assert _passes_by_step(tmp_path, train_shards, halt_during_stage1=True) == {1: 1.0, 2: 1.0}


def test_corpus_is_split_by_package_and_deterministic(tmp_path):
    from experiments.corpus import TRAIN_PACKAGES, VALID_PACKAGES, SplitSpec, package_root, write_split

    assert not set(TRAIN_PACKAGES) & set(VALID_PACKAGES)
    spec = SplitSpec("valid", VALID_PACKAGES, 200_000)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    facts = write_split(spec, first)
    write_split(spec, second)
    assert first.read_bytes() == second.read_bytes()
    assert 0 < facts["bytes"] <= spec.max_bytes
    texts = [json.loads(line)["text"] for line in first.read_text().splitlines()]
    assert len(texts) == facts["documents"]
    # Every document is the source of a file of one of the validation packages.
    sources = {
        name: {p.read_bytes().decode("utf-8", errors="replace") for p in package_root(name).rglob("*.py")}
        for name in VALID_PACKAGES
    }
    assert all(any(text in files for files in sources.values()) for text in texts)
    owners = {name for name, files in sources.items() for text in texts if text in files}
    assert len(owners) > 1  # the budget samples several packages, not the first one only


def test_the_full_study_commits_its_results_and_ignores_its_run_state():
    from experiments.arms import FULL
    from experiments.study import EXPERIMENTS, Layout

    layout = Layout(FULL, EXPERIMENTS / "work" / "full", EXPERIMENTS)
    name = run_name(arms(FULL)[0], 1)
    committed = [layout.result_file(name), layout.results / "table.csv", layout.out / "README.md"]
    ignored = [layout.run_dir(name) / "checkpoints" / "latest", layout.data / "train.bin", layout.logs]
    for path, expected in [(p, False) for p in committed] + [(p, True) for p in ignored]:
        check = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
        assert check.returncode == (0 if expected else 1), path


def test_stage1_options_are_compared_paired_by_seed_over_the_passes_both_curves_reach():
    from experiments.report import _overlap_differences

    def run(seed: int, curve: list[tuple[float, float]]) -> dict:
        return {"seed": seed, "tau_sweep": [{"mean_passes": p, "loss": x} for p, x in curve]}

    hold = [run(1, [(2.0, 5.0), (4.0, 4.0)]), run(2, [(3.5, 4.0), (3.9, 3.9)]), run(3, [(1.0, 6.0)])]
    multiplier = [run(1, [(1.0, 4.5), (3.0, 4.5)]), run(2, [(1.0, 4.0), (3.0, 4.0)])]
    # Seed 1: passes 2-3, hold's loss falls 5.0 -> 4.5 against a flat 4.5 (mean +0.25); seed 2's curves
    # do not overlap; seed 3 has no multiplier run.
    ((lo, hi, delta),) = _overlap_differences(hold, multiplier)
    assert (lo, hi) == (2.0, 3.0) and abs(delta - 0.25) < 1e-12


def test_an_invocation_killed_with_its_task_still_counts_in_the_wall_time(tmp_path, monkeypatch):
    import time

    import experiments.study as study_module
    from experiments.study import Layout, train

    layout = Layout(SMOKE, tmp_path / "work", tmp_path / "out")
    run_dir = layout.run_dir("vanilla-s1")
    run_dir.mkdir(parents=True)
    layout.logs.mkdir(parents=True)
    # Killed mid-run: its invocation opened at t-100 s and its log was last written at t-40 s.
    now = time.time()
    killed = {"seconds": 5.0, "invocations": 1, "open_since": now - 100}
    (run_dir / "wall.json").write_text(json.dumps(killed))
    log = layout.logs / "vanilla-s1.log"
    log.write_text("step 10/1000\n")
    os.utime(log, (now - 40, now - 40))
    monkeypatch.setattr(study_module.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    train(layout, "vanilla-s1", tmp_path / "config.yaml", None, lock_fd=0)
    wall = json.loads((run_dir / "wall.json").read_text())
    assert wall["invocations"] == 3 and "open_since" not in wall
    assert 65.0 <= wall["seconds"] < 75.0  # 5 + the killed one's 60 + this one's (a fake trainer: ~0)
