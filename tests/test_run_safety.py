"""A run directory never loses a complete checkpoint and never runs code from one (real CPU runs).

One 2-rank run stops at step 4 of 6 with checkpoints at steps 2 and 4; each test damages a copy of
it the way a user, a crash or a stranger would, and launches the run again.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PRETRAIN, REPO, command, environment, make_config, run_dir, summary, train

from training.checkpoint import _describe_own_files, _prune, latest_tag, tag_for, write_manifest
from training.export import main as export_main

RUN = {"train_steps": 6, "checkpoint__interval": 2, "checkpoint__keep_last": 0, "logging__eval_interval": 0}
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def source(tmp_path_factory, train_shards):
    config = make_config(tmp_path_factory.mktemp("source"), train_shards, "source", **RUN)
    train(config, "exit_at_step=4")
    return run_dir(config)


def copy_of(source: Path, tmp_path: Path, train_shards) -> tuple[Path, Path]:
    """A config for a copy of the source run directory, and the copy's checkpoints directory."""
    config = make_config(tmp_path, train_shards, "run", **RUN)
    shutil.copytree(source, run_dir(config))
    return config, run_dir(config) / "checkpoints"


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def run_state(files: dict[str, int]) -> dict[str, int]:
    """A listing without run.lock and ranks/, which record each launch (its pid and host; its phase
    and memory for failure reports: training/rank_status.py), not run state."""
    return {k: v for k, v in files.items() if k != "run.lock" and not k.startswith("ranks/")}


# "missing" runs by default; "empty" takes the same recovery path from another damage.
@pytest.mark.parametrize("damage", ["missing", pytest.param("empty", marks=pytest.mark.optin)])
def test_without_a_usable_latest_the_newest_complete_checkpoint_is_resumed_and_none_deleted(
    damage, source, tmp_path, train_shards
):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    if damage == "missing":
        (checkpoints / "latest").unlink()
    else:
        (checkpoints / "latest").write_text("")  # a torn write
    result = train(config)
    assert f"resuming from {checkpoints / tag_for(4)}, the newest complete checkpoint" in result.stdout
    assert "(full state) at step 4" in result.stdout
    assert {tag_for(s) for s in (2, 4, 6)} <= {p.name for p in checkpoints.iterdir()}
    assert summary(run_dir(config))["step"] == 6 and latest_tag(checkpoints) == tag_for(6)


def test_checkpoints_of_which_none_is_complete_are_an_error_not_a_fresh_start(source, tmp_path, train_shards):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    (checkpoints / "latest").unlink()
    for step in (2, 4):
        shard = checkpoints / tag_for(step) / SHARD
        shard.write_bytes(shard.read_bytes()[:1000])  # a copy that ran out of disk
    before = listing(run_dir(config))
    result = train(config, nproc=1, expect=2)  # torchrun would turn the exit status 2 into 1
    assert "holds checkpoints but none is complete and loadable" in result.stderr
    assert f"{checkpoints / tag_for(2) / SHARD} has 1000 bytes" in result.stderr

    # Nothing deleted, moved, overwritten or started.
    assert run_state(listing(run_dir(config))) == run_state(before)


def test_a_damaged_shard_is_named_and_the_previous_complete_checkpoint_resumed(
    source, tmp_path, train_shards
):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    shard = checkpoints / tag_for(4) / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern inside the Adam moments: the zip still opens
    shard.write_bytes(bytes(data))
    result = train(config)
    assert f"{shard} is damaged: its sha256 differs from the manifest's" in result.stdout
    assert f"resuming from {checkpoints / tag_for(2)}" in result.stdout and "at step 2" in result.stdout
    assert (checkpoints / f"{tag_for(4)}.set-aside" / SHARD).read_bytes() == bytes(data)  # kept, not deleted
    assert summary(run_dir(config))["step"] == 6


def test_a_refused_resume_leaves_config_yaml_as_it_was(source, tmp_path, train_shards):
    config, _ = copy_of(source, tmp_path, train_shards)
    saved = (run_dir(config) / "config.yaml").read_text()
    result = train(config, "model.overrides.hidden_size=32", nproc=1, expect=2)
    assert "the model config differs from the checkpoint's" in result.stderr
    assert "hidden_size: 64 -> 32" in result.stderr
    assert (run_dir(config) / "config.yaml").read_text() == saved


class Payload:
    """What a hostile checkpoint carries: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_and_the_payload_never_runs(
    source, tmp_path, train_shards, capsys
):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    marker = tmp_path / "payload-ran"
    shard = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    for step in (2, 4):
        path = checkpoints / tag_for(step)
        state = torch.load(path / shard, weights_only=False)  # the source run's own file: trusted
        state["note"] = Payload(marker)
        torch.save(state, path / shard)
        # As it would arrive from elsewhere: with a manifest that matches its files.
        write_manifest(path, step, {**_describe_own_files(path, 0), **_describe_own_files(path, 1)}, 2)
    result = train(config, nproc=1, expect=2)
    assert f"{checkpoints / tag_for(4) / shard}: refused to load" in result.stderr
    assert "GLOBAL exec" in result.stderr
    assert not marker.exists()
    assert export_main([str(run_dir(config)), str(tmp_path / "hf")]) == 2
    assert f"{checkpoints / tag_for(2) / shard}: refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_second_launch_on_a_live_run_directory_is_refused_and_a_killed_run_leaves_no_lock(
    tmp_path, train_shards
):
    config = make_config(tmp_path, train_shards, "live", train_steps=200, logging__eval_interval=0)
    first = subprocess.Popen(
        command(config, nproc=1),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        second = train(config, nproc=1, expect=2)
        assert (
            f"run directory {run_dir(config)} is in use by another run (pid {first.pid} on host"
            in second.stderr
        )
    finally:
        first.kill()
        first.wait(timeout=60)
    # The killed run's lock went with its process: a relaunch resumes its last checkpoint.
    tag = latest_tag(run_dir(config) / "checkpoints")
    stop = (int(tag.split("-")[-1]) if tag else 0) + 1
    train(config, f"exit_at_step={stop}", nproc=1)
    assert summary(run_dir(config))["status"] == f"stopped at exit_at_step={stop}"


# Runs the training entry point with os.fsync, os.replace and shutil.rmtree recorded, in order.
RECORDER = """
import json, os, runpy, shutil, sys
log = open(sys.argv[1], "a")
fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree
def record(*event):
    log.write(json.dumps(event) + "\\n")
    log.flush()
def recorded_fsync(fd):
    record("fsync", os.readlink(f"/proc/self/fd/{fd}"))
    fsync(fd)
def recorded_replace(src, dst, *args, **kwargs):
    replace(src, dst, *args, **kwargs)
    record("replace", os.fspath(dst))
def recorded_rmtree(path, *args, **kwargs):
    record("rmtree", os.fspath(path))
    rmtree(path, *args, **kwargs)
os.fsync, os.replace, shutil.rmtree = recorded_fsync, recorded_replace, recorded_rmtree
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_checkpoints_are_durable_before_latest_moves_and_pruned_only_after(tmp_path, train_shards):
    config = make_config(
        tmp_path,
        train_shards,
        "durable",
        train_steps=3,
        checkpoint__interval=1,
        checkpoint__keep_last=1,
        logging__eval_interval=0,
    )
    log = tmp_path / "events.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", RECORDER, str(log), str(PRETRAIN), "--config", str(config)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = run_dir(config) / "checkpoints"
    events = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    latest_moves = [i for i, e in enumerate(events) if e == ("replace", str(checkpoints / "latest"))]
    assert len(latest_moves) == 3
    names = list(json.loads((checkpoints / tag_for(3) / "manifest.json").read_text())["files"])
    assert len(names) == 3  # the train state and rank 0's two shards
    for step, moved in enumerate(latest_moves, 1):
        before, after = events[:moved], events[moved + 1 :]
        path = checkpoints / tag_for(step)
        for name in names:
            assert ("fsync", str(path / name)) in before, (step, name)
        manifest = before.index(("fsync", str(path / "manifest.json.tmp")))  # written aside, then renamed
        assert ("replace", str(path / "manifest.json")) in before[manifest:]
        assert ("fsync", str(path)) in before  # the directory's entries
        assert ("fsync", str(checkpoints)) in after[:2]  # the rename of `latest` itself
        if step > 1:
            pruned = events.index(("rmtree", str(checkpoints / f"{tag_for(step - 1)}.pruning")))
            assert pruned > moved
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [tag_for(3)]


def test_export_is_all_or_nothing_and_never_overwrites_a_foreign_directory(source, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert export_main([str(source), str(foreign)]) == 2
    assert "is a non-empty directory that is not an earlier export" in capsys.readouterr().err
    assert listing(foreign) == {"mine.txt": 4}
    out = tmp_path / "hf"
    # The tokenizer is written after the weights: the failure comes late.
    assert export_main([str(source), str(out), "--tokenizer", str(tmp_path / "gone.json")]) == 2
    assert "gone.json: not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no half-written directory
    assert export_main([str(source), str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert export_main([str(source), str(out), "--tag", tag_for(2)]) == 0  # an earlier export is replaced
    assert json.loads((out / "export_info.json").read_text())["step"] == 2
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes"]


HOLD_AND_FORK = """
import os, signal, sys, time
from training.rundir import RunLock
lock = RunLock(sys.argv[1])
if os.fork() == 0:  # a child that outlives its parent, like a data-loader worker of a killed rank
    for fd in (1, 2):  # let the parent's pipes close, so that the test does not wait for the child
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_dies_with_its_holder_even_while_a_forked_child_lives(tmp_path):
    from training.rundir import RunLock

    holder = subprocess.run(
        [sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)],
        env={**environment(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert holder.stdout == "locked\n" and holder.returncode == -signal.SIGKILL
    RunLock(tmp_path).close()  # the child still sleeps, and the directory is free


# ZeRO-2 runs by default; ZeRO-1 saves the same optimizer fragments.
@pytest.mark.parametrize("stage", [pytest.param("zero1", marks=pytest.mark.optin), "zero2"])
def test_zero1_and_zero2_checkpoints_pass_the_safe_loader_and_resume(tmp_path, train_shards, stage):
    # Their optimizer shards hold DeepSpeed's fragment_address dataclass: refused before it was allowed.
    config = make_config(
        tmp_path,
        train_shards,
        stage,
        train_steps=3,
        deepspeed_config=str(REPO / "ds_configs" / f"{stage}.json"),
        logging__eval_interval=0,
    )
    train(config, "exit_at_step=2", nproc=1)
    resumed = train(config, nproc=1)
    assert "resumed from" in resumed.stdout and "step-00000002" in resumed.stdout
    assert summary(run_dir(config))["status"] == "finished"


def test_deleting_run_lock_does_not_free_a_live_run_directory(tmp_path):
    from training.rundir import RunLock

    held = RunLock(tmp_path)
    try:
        (tmp_path / "run.lock").unlink()  # "looks stale"
        with pytest.raises(ValueError, match="is in use by another run"):
            RunLock(tmp_path).close()
        (tmp_path / "run.lock").write_text("someone else's file\n")  # replaced, not only deleted
        with pytest.raises(ValueError, match="is in use by another run"):
            RunLock(tmp_path).close()
    finally:
        held.close()
    RunLock(tmp_path).close()  # free once its holder let go


def test_pruning_keeps_a_symlinked_checkpoint_and_finishes_half_deleted_ones(
    source, tmp_path, train_shards, capsys
):
    _, checkpoints = copy_of(source, tmp_path, train_shards)
    archive = tmp_path / "archive" / tag_for(2)
    archive.parent.mkdir()
    (checkpoints / tag_for(2)).rename(archive)
    (checkpoints / tag_for(2)).symlink_to(archive)  # an old checkpoint kept on another disk
    half = checkpoints / f"{tag_for(1)}.pruning"  # a prune cut short by a crash
    (half / "global_step1").mkdir(parents=True)
    (half / "global_step1" / SHARD).write_bytes(b"x" * 10)
    shutil.copytree(checkpoints / tag_for(4), checkpoints / tag_for(6))
    _prune(checkpoints, keep_last=2)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [tag_for(2), tag_for(4), tag_for(6)]
    assert (checkpoints / tag_for(2)).is_symlink() and listing(archive) == listing(
        source / "checkpoints" / tag_for(2)
    )


def test_a_failing_prune_does_not_fail_the_save(source, tmp_path, train_shards, monkeypatch, capsys):
    _, checkpoints = copy_of(source, tmp_path, train_shards)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    _prune(checkpoints, keep_last=1)  # after `latest` moved: a warning, not an error
    assert "pruning old checkpoints" in capsys.readouterr().out
    monkeypatch.undo()
    _prune(checkpoints, keep_last=1)  # the next save finishes it
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [tag_for(4)]


def test_re_export_keeps_what_others_put_in_the_export(source, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_main([str(source), str(out)]) == 0
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    (out / "NOTES.md").write_text("mine")
    assert export_main([str(source), str(out), "--tag", tag_for(2)]) == 0
    assert json.loads((out / "export_info.json").read_text())["step"] == 2
    assert (out / "eval" / "results.json").read_text() == "{}" and (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # A file of the user's under a name the export writes is refused, not overwritten.
    info = json.loads((out / "export_info.json").read_text())
    info["files"].remove("config.json")
    (out / "export_info.json").write_text(json.dumps(info))
    assert export_main([str(source), str(out)]) == 2
    assert "holds config.json, which the earlier export did not write" in capsys.readouterr().err
    assert json.loads((out / "export_info.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_through_a_symlink_writes_where_it_points(source, tmp_path):
    real, link = tmp_path / "disk" / "hf", tmp_path / "hf"
    real.parent.mkdir()
    assert export_main([str(source), str(real), "--tag", tag_for(2)]) == 0
    link.symlink_to(real)
    assert export_main([str(source), str(link)]) == 0
    assert link.is_symlink() and json.loads((real / "export_info.json").read_text())["step"] == 4
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert export_main([str(source), str(tmp_path / "dangling")]) == 2


def test_export_of_an_older_latest_says_it_reads_and_moves_nothing(source, tmp_path, train_shards, capsys):
    _, checkpoints = copy_of(source, tmp_path, train_shards)
    (checkpoints / "latest").write_text(tag_for(2))
    assert export_main([str(checkpoints.parent), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "moving aside" not in err and "resuming" not in err
    assert f"reading {checkpoints / tag_for(2)}" in err and f"not using the newer {tag_for(4)}" in err
    assert (checkpoints / tag_for(4)).is_dir()


def test_a_resume_under_another_zero_stage_or_precision_is_refused_and_changes_nothing(
    source, tmp_path, train_shards
):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    (checkpoints / "latest").write_text(tag_for(2))  # a resume would move step 4 aside
    before = run_state(listing(run_dir(config)))
    zero2 = f"deepspeed_config={REPO / 'ds_configs' / 'zero2.json'}"
    for override, message in [(zero2, "ZeRO stage 3 (this launch: 2)"), ("precision=bf16", "precision fp32")]:
        result = train(config, override, expect=1)  # torchrun turns the exit status 2 into 1
        assert f"{checkpoints / tag_for(2)} was saved with {message}" in result.stderr, result.stderr[-2000:]
        assert run_state(listing(run_dir(config))) == before  # nothing moved aside, `latest` as it was
    state = json.loads((checkpoints / tag_for(4) / "train_state.json").read_text())
    assert (state["zero_stage"], state["precision"]) == (3, "fp32")


def test_exit_at_step_already_passed_is_refused(source, tmp_path, train_shards):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    result = train(config, "exit_at_step=3", nproc=1, expect=2)
    assert "exit_at_step=3: the run is already at step 4" in result.stderr
    assert latest_tag(checkpoints) == tag_for(4)


def test_train_steps_raised_within_the_epoch_resumes_and_names_what_changed(source, tmp_path, train_shards):
    config, checkpoints = copy_of(source, tmp_path, train_shards)
    result = train(config, "train_steps=8", "exit_at_step=5", "optimizer.lr=0.002")
    assert f"WARNING: resuming from {checkpoints / tag_for(4)} with settings changed since it was saved" in (
        result.stdout
    )
    assert "optimizer.lr: 0.003 -> 0.002" in result.stdout and "train_steps: 6 -> 8" in result.stdout
    assert "exit_at_step" not in result.stdout.split("settings changed", 1)[1].split("\n")[0]
    assert summary(run_dir(config))["step"] == 5


def test_an_export_racing_a_prune_is_a_clear_error(source, tmp_path, train_shards, monkeypatch, capsys):
    import training.export as export_module

    _, checkpoints = copy_of(source, tmp_path, train_shards)
    read = export_module.consolidated_state_dict

    def pruned_meanwhile(checkpoint_dir, tag):
        (checkpoints / tag).rename(checkpoints / f"{tag}.pruning")  # what a live run's prune does first
        return read(checkpoint_dir, tag)

    monkeypatch.setattr(export_module, "consolidated_state_dict", pruned_meanwhile)
    assert export_main([str(checkpoints.parent), str(tmp_path / "hf")]) == 2
    assert f"checkpoint {checkpoints / tag_for(4)} changed while it was read" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_preemption_notice_during_initialisation_stops_at_the_first_step_with_a_checkpoint(
    tmp_path, train_shards
):
    config = make_config(tmp_path, train_shards, "preempted", **RUN)
    status = run_dir(config) / "ranks" / "rank-0.json"
    proc = subprocess.Popen(
        command(config, nproc=1), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not status.exists():  # written once the launch holds the run directory: initialising
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert (summary(run_dir(config))["status"], summary(run_dir(config))["step"]) == (
        "stopped by signal (SIGTERM)",
        1,
    )
    assert latest_tag(run_dir(config) / "checkpoints") == tag_for(1)
