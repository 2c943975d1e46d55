"""The study (experiments/) at toy size: it runs, stops, resumes, does not redo work, and reports.

Also the stage-1 option it compares: `ponder.halt_during_stage1: false` runs every token through all
passes while the ponder loss is off, whatever the gates say.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, environment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.arms import SMOKE, arms, jobs, run_name, train_steps


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


SMOKE_ARMS = "vanilla,ponderlm,adaponder,adaponder-cont"  # every kind: plain, swept, adaptive, continued


def test_smoke_study_stops_resumes_and_reports(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    names = [run_name(arm, seed) for arm, seed in jobs(SMOKE, SMOKE_ARMS.split(","))]

    # An interrupted study: one arm stopped halfway, the others not started.
    study(tmp_path, "run", "--arms", "adaponder", "--exit-at-step", "4")
    readme = (out / "README.md").read_text()
    assert "PARTIAL RESULTS" in readme
    assert "adaponder-s1 (stopped at step-00000004" in readme
    assert "vanilla-s1 (not started)" in readme
    # A continued arm whose source is neither trained nor asked for is not started.
    refused = study(tmp_path, "run", "--arms", "adaponder-cont", code=1)
    assert "adaponder-cont-s1: not started, it needs ponderlm-s1 trained first" in refused.stdout

    # Rerun: the stopped run resumes from its checkpoint, the others train (the continued one after
    # its source); everything is evaluated.
    first = study(tmp_path, "run", "--arms", SMOKE_ARMS)
    assert "adaponder-s1: trained and evaluated" in first.stdout
    assert first.stdout.index("ponderlm-s1: trained and evaluated") < first.stdout.index("exported")
    log = (work / "logs" / "adaponder-s1.log").read_text()
    assert "at step 4" in log.split("====")[-1]  # the second invocation resumed
    assert json.loads((work / "runs" / "adaponder-s1" / "wall.json").read_text())["invocations"] == 2
    results = {n: json.loads((out / "results" / "by_run" / f"{n}.json").read_text()) for n in names}
    assert {results[n]["train_tokens"] for n in names if "cont" not in n} == {SMOKE.tokens}
    continued = yaml.safe_load((work / "configs" / "adaponder-cont-s1.yaml").read_text())
    assert continued["model"]["init_from"] == str(work / "exports" / "ponderlm-s1")
    assert continued["data"]["start_sample"] == SMOKE.train_steps * SMOKE.batch_size
    assert results["adaponder-cont-s1"]["train_tokens"] == SMOKE.tokens // 2
    for arm, seed in jobs(SMOKE, SMOKE_ARMS.split(",")):
        r = results[run_name(arm, seed)]
        assert r["adaptive"] == arm.adaptive
        assert set(r["shards"]) == {"code", "programs"}
        curve = r["training_curve"]
        assert [s for s, _ in curve["lm_loss"]] == list(range(1, train_steps(arm, SMOKE) + 1))
        assert all(1.0 <= v <= 4.0 for _, v in curve["mean_passes"])
        assert ("gate_mean_0" in curve) == arm.adaptive
        sweep = r["sweep"]
        if arm.adaptive:
            assert [p["tau"] for p in sweep["learned"]] == sorted(SMOKE.taus)
            assert len(sweep["fixed"]) == len(SMOKE.taus) * 4  # 2 policies x gates' scaling kept, neutralised
            for fixed in sweep["fixed"]:
                assert len(fixed["draws"]) == SMOKE.draws
                assert abs(fixed["draws"][0]["mean_passes"] - fixed["target_mean_passes"]) < 0.05
            forced = r["shards"]["code"]["forced_by_learned_depth"]
            assert sum(d["share"] for d in forced) == pytest.approx(1.0)
        elif arm.name == "ponderlm":  # the adaptive arm's training-free baselines
            assert [f["target_mean_passes"] for f in sweep["fixed"]] == [
                m for m in SMOKE.pass_grid for _ in "ug"
            ]
            assert [p["confidence"] for p in sweep["confidence"]] == list(SMOKE.confidences)
        else:
            assert set(sweep) == {"trained"}
    readme = (out / "README.md").read_text()
    for arm in arms(SMOKE):
        if arm.name in SMOKE_ARMS.split(","):
            assert f"| {arm.label} | 1 |" in readme
    for plot in ("ppl_vs_compute.png", "nll_by_depth.png", "gates_in_training.png"):
        assert (out / "results" / plot).read_bytes()[:4] == b"\x89PNG"

    # Again: nothing is retrained or re-evaluated.
    stamps = {n: (out / "results" / "by_run" / f"{n}.json").stat().st_mtime_ns for n in names}
    again = study(tmp_path, "run", "--arms", SMOKE_ARMS)
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


def _finished(layout, name: str, steps: int, loss: float) -> None:
    run_dir = layout.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "finished", "step": steps, "eval": {"lm_loss": loss}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("losses, chosen", [((3.0, 2.9), 0.5), ((2.9, 3.0), 1.0)])
def test_a_tuned_arm_trains_its_other_seeds_at_the_lr_its_first_seed_chose(tmp_path, losses, chosen):
    from experiments.arms import DEEP_LRS, arm_named
    from experiments.study import Layout, checked_config, needs

    assert DEEP_LRS == (1.0, 0.5)
    scale = dataclasses.replace(SMOKE, seeds=(1, 2))
    layout = Layout(scale, tmp_path / "work", tmp_path / "out")
    deep = arm_named(scale, "vanilla-deep")
    assert [run_name(a, s) for a, s in jobs(scale) if a.name.startswith("vanilla-deep")] == [
        "vanilla-deep-lr1-s1",
        "vanilla-deep-lr0.5-s1",
        "vanilla-deep-s2",
    ]
    assert [run_name(a, s) for a, s in needs(layout, deep, 2)] == [
        "vanilla-deep-lr1-s1",
        "vanilla-deep-lr0.5-s1",
    ]
    for (name, _), loss in zip(needs(layout, deep, 2), losses):
        _finished(layout, run_name(name, 1), scale.train_steps, loss)
    config = yaml.safe_load(checked_config(layout, deep, 2).read_text())
    assert config["optimizer"]["lr"] == pytest.approx(scale.lr * chosen)
    assert config["model"]["overrides"]["num_hidden_layers"] > scale.model["num_hidden_layers"]


class _FakeRunner:
    """Trains a run by writing its summary; records the order runs started and finished in."""

    def __init__(self, layout):
        self.layout, self.events, self.stopping = layout, [], False

    def run(self, name: str) -> int:
        from experiments.arms import arm_named

        self.events.append(f"start {name}")
        arm = arm_named(self.layout.scale, name.rsplit("-s", 1)[0])
        _finished(self.layout, name, train_steps(arm, self.layout.scale), 3.0)
        self.events.append(f"end {name}")
        return 0


def test_the_schedule_starts_a_run_only_once_the_runs_it_needs_are_trained(tmp_path):
    from experiments.study import Layout, schedule

    layout = Layout(SMOKE, tmp_path / "work", tmp_path / "out")
    todo = jobs(SMOKE, ["adaponder-cont", "ponderlm-more", "ponderlm", "vanilla"])
    assert [run_name(a, s) for a, s in todo][:2] == ["vanilla-s1", "ponderlm-s1"]
    runner = _FakeRunner(layout)
    assert set(schedule(layout, todo, 2, runner).values()) == {0}
    ends = runner.events.index("end ponderlm-s1")
    assert runner.events.index("start adaponder-cont-s1") > ends
    assert runner.events.index("start ponderlm-more-s1") > ends
    # Its source neither trained nor among the runs: not started, and nothing waits forever.
    other = Layout(SMOKE, tmp_path / "other", tmp_path / "out2")
    codes = schedule(other, jobs(SMOKE, ["adaponder-cont"]), 2, _FakeRunner(other))
    assert codes == {"adaponder-cont-s1": 1}


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
    broken["shards"]["code"]["loss"] *= 2
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

    def result(arm: str, loss: float, sweep: float, wall: float) -> dict:
        shard = {"loss": loss, "mean_passes": 3.0, "tokens": 10, "nll_by_passes": [None, 2.0]}
        return {
            "arm": arm,
            "shards": {"code": shard, "programs": dict(shard, loss=loss + 1.0, tokens=30)},
            "sweep": {"trained": [{"loss": sweep}]},
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
    # A tau-sweep point off by 1e-3: not the same run, but within the seed spread (std 1.41 nats).
    deep = write(tmp_path / "deep", {"a-s1": result("a", 100.0, 110.11, 5.0)}, "y")
    (run,) = compare(reference, deep)["runs"]
    assert (run["verdict"], run["at"]) == ("within the seed spread", "sweep.trained.0.loss")
    assert (run["loss_reference"], run["loss_rerun"]) == (100.75, 100.75)  # token-weighted over the shards
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


# Opt-in: a trainer option the first version of the study compared (its adaponder-hold arm).
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
