"""What a user watches: console lines, W&B (offline, its history read back) and the CSV monitor, of one
1-rank run that starts with a gates-only phase."""

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import command, environment, make_config, run_dir

from training import engine

STEPS = 4


@pytest.fixture(scope="module")
def watched(tmp_path_factory, train_shards):
    config = make_config(
        tmp_path_factory.mktemp("watched"),
        train_shards,
        "watched",
        train_steps=STEPS,
        checkpoint__interval=0,
        logging__eval_interval=2,
        logging__csv_monitor=True,
        logging__wandb_project="adaponder-test",
        ponder__gates_only=2,
    )
    env = {**environment(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(command(config, nproc=1), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir(config), result


def wandb_history(run: Path) -> list[dict[str, float]]:
    """The history rows of the run's offline `.wandb` file: a LevelDB-style log (7-byte file header,
    32 KiB blocks of records with a 7-byte header: crc, length, type 1 full / 2 first / 3 middle /
    4 last) of protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                )
    return rows


def documented_tags(k: int = 4) -> set[str]:
    """Every scalar of docs/metrics.md's table, with {j} and {u} expanded for K passes."""
    text = (Path(engine.__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    tags = set()
    for tag, kind in re.findall(r"^\| `([^`]+)` \| (\w+) \|", text, re.M):
        if kind != "scalar":
            continue
        if "{j}" in tag:
            tags |= {tag.replace("{j}", str(j)) for j in range(1, k + 1)}
        else:
            tags.add(tag)
    return tags


def test_wandb_holds_every_documented_scalar_at_every_logged_step(watched):
    run, result = watched
    assert "Tried to log to step" not in result.stdout + result.stderr
    rows = wandb_history(run)
    by_step: dict[int, set[str]] = {}
    for row in rows:
        by_step.setdefault(int(row["_step"]), set()).update(row)
    assert sorted(by_step) == list(range(1, STEPS + 1))  # optimizer steps, nothing on a samples axis
    train_tags = {t for t in documented_tags() if not t.startswith("eval/")}
    for step, tags in by_step.items():
        assert train_tags <= tags, (step, sorted(train_tags - tags))
        if step % 2 == 0:  # eval_interval: nll_by_passes/{j} only for pass counts some token used
            assert {"eval/lm_loss", "eval/ppl", "eval/mean_passes", "eval/token_fraction_by_passes/4"} <= tags
    assert not any(tag.startswith("Train/Samples") for tags in by_step.values() for tag in tags)


def test_csv_monitor_has_only_the_documented_learning_rates(watched):
    run, _ = watched
    files = {p.name for p in (run / "monitor" / "csv").iterdir()}
    assert {"train_lr.csv", "train_lr_gates.csv", "train_lr_backbone.csv"} <= files
    assert not any(name.startswith("Train_Samples") for name in files)  # DeepSpeed's group-0 lr


def test_console_lines_carry_time_elapsed_eta_and_both_learning_rates(watched):
    _, result = watched
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == STEPS
    clock = re.compile(r"\| \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| elapsed \d\d:\d\d:\d\d \| ETA \d\d:\d\d:\d\d$")
    assert all(clock.search(line) for line in steps), steps
    assert steps[-1].endswith("ETA 00:00:00")
    # gates-only phase (steps 1, 2): the backbone's lr is 0, the gates' is not
    for line in steps[:2]:
        assert " | lr 0 | " in line and not re.search(r"gate lr 0 ", line), line
    assert " | lr 0 | " not in steps[-1]
    initial = next(line for line in result.stdout.splitlines() if line.startswith("initial weights:"))
    assert initial == "initial weights: random (preset tiny, seed 1234)"
    assert "FutureWarning" not in result.stderr


def test_a_first_start_says_it_compiles_the_cpu_communication_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine._announce_cpu_comm_op_build()
    assert "compiling DeepSpeed's shared-memory communication op" in capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()  # left by a start killed while compiling
    engine._announce_cpu_comm_op_build()
    assert f"{tmp_path / 'deepspeed_shm_comm' / 'lock'} must be deleted" in capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    engine._announce_cpu_comm_op_build()
    assert capsys.readouterr().out == ""


def test_the_op_cache_is_kept_per_python_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    mine = engine.extensions_dir()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(engine.sys, "prefix", str(tmp_path / "other-venv"))
    assert engine.extensions_dir() != mine and os.environ["TORCH_EXTENSIONS_DIR"].endswith(
        engine.extensions_dir().name
    )
