"""The rank watchdog (training/rank_status.py) never kills a run that makes progress: another host's
clock is never compared with this one's, a failed status write is retried, and an abort needs a rank
that is really gone. One rank of a real 2-rank run is made to look remote (tests/remote_rank_worker.py:
another hostname, a clock 30 s behind, failing status writes); a really dead remote rank is still
named."""

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import environment, make_config, run_dir, summary

from training import rank_status
from training.distributed import free_port
from training.rank_status import RankStatus, read_statuses, status_path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "remote_rank_worker.py"
HEARTBEAT_S = 0.5  # silent after 10 heartbeats: 5 s; the abort waits 5 s more


def _until(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met")


class RemotePeer:
    """A rank's status file as written from another host: its own hostname and a clock `skew_s`
    behind this one's; it beats every `beat_s` until stopped."""

    def __init__(self, run_dir: Path, rank: int, run_id: str, skew_s: float, beat_s: float):
        self.path = status_path(run_dir, rank)
        self.record = {"rank": rank, "pid": 1, "host": "node-b", "boot_id": "other-machine", "run_id": run_id}
        self.record.update(phase="forward", step=5, micro=0, beat=0, rss_gib=1.0, run_peak_rss_gib=1.0)
        self.skew_s, self.beat_s = skew_s, beat_s
        self.beating = threading.Event()
        self.beating.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._write()
        self._thread.start()

    def _write(self) -> None:
        self.record["beat"] += 1
        self.record["updated"] = self.record["since"] = time.time() - self.skew_s
        tmp = self.path.with_suffix(".peer-tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while self.beating.is_set():
            self._write()
            time.sleep(self.beat_s)


@pytest.fixture
def no_exit(monkeypatch):
    """os._exit of the watchdog, recorded instead of ending the test process."""
    exits = []
    monkeypatch.setattr(rank_status.os, "_exit", lambda code: exits.append(code))
    return exits


def test_a_remote_clock_30_s_behind_is_not_silence_and_a_stopped_heartbeat_is(tmp_path, no_exit, capsys):
    status = RankStatus(tmp_path, 0, 2, run_id="run", heartbeat_s=0.05, abort_after_s=0.3)
    peer = RemotePeer(tmp_path, 1, "run", skew_s=30.0, beat_s=0.05)
    try:
        # 30 s of skew against a 0.5 s silence limit (10 heartbeats); ten limits' worth of checks.
        time.sleep(10 * 10 * 0.05)
        assert not (tmp_path / "ranks" / "failure.txt").exists(), (
            tmp_path / "ranks" / "failure.txt"
        ).read_text()
        peer.beating.clear()  # the host goes away: its heartbeat stops changing
        failure = _until(
            lambda: (
                (tmp_path / "ranks" / "failure.txt").exists()
                and (tmp_path / "ranks" / "failure.txt").read_text()
            )
        )
        assert "rank 1 silent for" in failure and "node-b" in failure
        _until(lambda: no_exit, timeout=30)  # this rank makes no progress either: it leaves
        assert no_exit == [1]
        assert "exiting: rank 1 is gone" in capsys.readouterr().err
    finally:
        peer.beating.clear()
        status.finish()


def test_the_watchdog_does_not_abort_a_rank_that_keeps_making_progress(tmp_path, no_exit, capsys):
    status = RankStatus(tmp_path, 0, 2, run_id="run", heartbeat_s=0.05, abort_after_s=0.5)
    peer = RemotePeer(tmp_path, 1, "run", skew_s=0.0, beat_s=0.05)
    peer.beating.clear()  # silent from the start: reported after 0.5 s
    try:
        _until(lambda: (tmp_path / "ranks" / "failure.txt").exists())
        for step in range(6, 40):  # yet this rank's steps go on (its collectives return)
            status.enter("forward", step, 0)
            time.sleep(0.03)
        assert no_exit == []
        assert "not exiting" in capsys.readouterr().err
    finally:
        status.finish()


def test_failed_status_writes_are_logged_and_retried(tmp_path, monkeypatch, capsys):
    write, calls = rank_status._write_json, []

    def flaky(path: Path, text: str) -> None:
        calls.append(path)
        if 2 <= len(calls) <= 4:  # the constructor's write succeeds; three heartbeats fail
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        write(path, text)

    monkeypatch.setattr(rank_status, "_write_json", flaky)
    status = RankStatus(tmp_path, 0, 1, run_id="run", heartbeat_s=0.05)
    try:
        _until(lambda: len(calls) >= 6)
        assert status._thread.is_alive()
        beat = _until(
            lambda: (
                read_statuses(tmp_path).get(0, {}).get("beat", 0) >= 3 and read_statuses(tmp_path)[0]["beat"]
            )
        )
        assert beat >= 3
        err = capsys.readouterr().err
        assert "could not write its status file" in err and "No space left on device" in err
        assert err.count("could not write") == 1  # logged once per streak, not at every beat
        assert not list((tmp_path / "ranks").glob("*.tmp*"))
    finally:
        status.finish()
    assert read_statuses(tmp_path)[0]["phase"] == "exited"


def _torchrun(config: Path, nnodes: int, node_rank: int, port: int, env: dict) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--nproc_per_node", str(3 - nnodes),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(WORKER), "--config", str(config),
    ]  # fmt: skip


def _env(**changes: str) -> dict:
    env = environment()
    env.update(ADAPONDER_HEARTBEAT_S=str(HEARTBEAT_S), ADAPONDER_ABORT_AFTER_S=str(10 * HEARTBEAT_S))
    env.update(SIM_RANK="1", SIM_SKEW_S="30", SIM_HOST="simulated-remote-host", **changes)
    return env


def test_a_healthy_run_with_a_skewed_remote_rank_and_a_failed_write_runs_to_its_end(tmp_path, train_shards):
    config = make_config(tmp_path, train_shards, "skewed", train_steps=16, logging__eval_interval=0)
    env = _env(SIM_FAIL_WRITES="3,4")
    result = subprocess.run(
        _torchrun(config, 1, 0, free_port(), env), env=env, capture_output=True, text=True, timeout=300
    )
    run = run_dir(config)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (summary(run)["status"], summary(run)["step"]) == ("finished", 16)
    assert not (run / "ranks" / "failure.txt").exists(), (run / "ranks" / "failure.txt").read_text()
    assert "Disk quota exceeded (simulated)" in result.stderr  # the failed write happened, and was survived
    assert "silent" not in result.stderr and "exiting" not in result.stderr


def test_a_remote_rank_whose_host_dies_is_named(tmp_path, train_shards):
    config = make_config(
        tmp_path, train_shards, "lost", train_steps=400, logging__eval_interval=0, checkpoint__interval=0
    )
    run, port, env = run_dir(config), free_port(), _env()
    nodes = [
        subprocess.Popen(
            _torchrun(config, 2, node, port, env),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if node == 0 else subprocess.DEVNULL,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        _until(lambda: (read_statuses(run).get(1) or {}).get("step", 0) or 0 >= 3, timeout=240)
        victim = psutil.Process(nodes[1].pid)
        for process in [victim, *victim.children(recursive=True)]:  # the whole host: agent and rank
            process.kill()
        stderr = nodes[0].communicate(timeout=240)[1]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert nodes[0].returncode != 0
    failure = (run / "ranks" / "failure.txt").read_text()
    for text in (failure, stderr):
        assert "rank 1 silent for" in text and "simulated-remote-host" in text, text[-3000:]
