"""What every rank is doing and how much memory it holds, on disk, so that a dead rank can be named.

Each rank keeps `<run_dir>/ranks/rank-<r>.json`: phase (init, forward, backward, step, eval,
checkpoint), step, micro-batch, resident memory now, its peak since the last measured phase and
over the run, and the accelerator allocator's figures on a GPU. Entering a phase only records it in
memory; a thread writes the file every `heartbeat_s` seconds, at once when a phase outside the
steady micro-batch loop begins or ends (init, eval, checkpoint, the first `breakdown_steps` steps),
and the rank writes it a last time when it exits or fails. So the training loop does no file I/O
per micro-batch, and a rank killed there is described as of its last heartbeat.

When the kernel's OOM killer (SIGKILL) ends a rank, the others only see a collective fail
("connection reset by peer") or hang; the watchdog thread of every rank notices the peer's process
is gone (same host: its pid; another host: its heartbeat stops) and prints which rank died, what it
was doing and its last measured peak, and writes the same to `<run_dir>/ranks/failure.txt`. A rank
that catches an exception records it ("failed") before exiting, so that the others report that
instead.

A rank on another host is judged by its heartbeat counter (`beat`, one more at every write): the
watchdog notes, on this host's monotonic clock, when it last saw the counter change, and calls the
rank silent after `10 * heartbeat_s` without a change. No clock of another machine is compared with
this one's, so clock skew between hosts cannot make a live rank look dead. A status write that fails
(a full disk, a network file system hiccup) is logged and retried at the next heartbeat; the thread
never stops for it. After reporting a gone rank the watchdog waits `abort_after_s`, then ends this
process only if the rank is still gone and this rank has made no progress meanwhile (a collective
with a dead peer never returns), naming the rank in its last message.

`ADAPONDER_HEARTBEAT_S` (default 2) and `ADAPONDER_ABORT_AFTER_S` (default 60) set the two times.

Per-phase peaks on CPU come from the kernel's resident-size high-water mark (VmHWM), reset at the
entry of each phase outside the steady loop through /proc/self/clear_refs; on a GPU from the
caching allocator's peak, reset the same way. The first `breakdown_steps` steps' figures are kept
per phase ("breakdown"); after them the marks run on, so the heartbeat still sees the run's peak.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
STATUS_DIR = "ranks"
FINISHED = ("exited", "failed")
STALE_BEATS = 10  # a rank on another host is silent after this many heartbeats without one
# The process's peaks over the run; per-phase resets of the kernel's and allocator's marks lose them.
_RUN_PEAK = {"peak_rss_gib": 0.0, "device_peak_gib": 0.0}
_RUN_PEAK_LOCK = threading.Lock()  # the status thread and the training thread (metrics) both note peaks


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_gib() -> float:
    """This process's resident set size now (Linux; 0 elsewhere)."""
    kib = _proc_status_kib("VmRSS")
    return (kib or 0) / 2**20


def _reset_peak(device: int | None = None) -> bool:
    """Start a new high-water mark of resident memory (and of the GPU allocator's peak)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_now(device: int | None = None) -> dict[str, float]:
    """Resident size now and its peak since the last reset; the GPU allocator's, when there is one
    (of `device`: a thread's current device is not the rank's)."""
    figures = {"rss_gib": resident_gib(), "peak_rss_gib": (_proc_status_kib("VmHWM") or 0) / 2**20}
    # Resident size split: tensors and heap (anonymous), code and mapped files, shared memory.
    for field in ("RssAnon", "RssFile", "RssShmem"):
        figures[f"{field[3:].lower()}_rss_gib"] = (_proc_status_kib(field) or 0) / 2**20
    if torch.cuda.is_available():
        figures["device_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        figures["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        figures["device_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
    return figures


def run_peak_gib() -> float:
    """Peak memory of this process so far: the GPU allocator's on a GPU, else the resident size."""
    figures = memory_now()
    _note_peaks(figures)
    return _RUN_PEAK["device_peak_gib" if torch.cuda.is_available() else "peak_rss_gib"]


def _note_peaks(figures: dict[str, float]) -> None:
    with _RUN_PEAK_LOCK:
        for name in _RUN_PEAK:
            _RUN_PEAK[name] = max(_RUN_PEAK[name], figures.get(name, 0.0))


def status_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / STATUS_DIR / f"rank-{rank}.json"


def _write_json(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also collect half-written copies
        raise


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name`, else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def _boot_id() -> str:
    """This machine's boot id (Linux): two containers may share a hostname, never a boot id."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def same_host(record: dict[str, Any]) -> bool:
    """Whether `record` was written on this machine, where its pid can be looked up."""
    return record.get("host") == socket.gethostname() and record.get("boot_id", _boot_id()) == _boot_id()


class PeerWatch:
    """When each other rank's heartbeat last changed, on this host's monotonic clock."""

    def __init__(self):
        self._seen: dict[int, tuple[tuple, float]] = {}

    def observe(self, statuses: dict[int, dict[str, Any]]) -> dict[int, float]:
        """Seconds since each rank's heartbeat (its counter, pid or run) was last seen to change."""
        now = time.monotonic()
        silence = {}
        for rank, record in statuses.items():
            # A record without a counter still changes its own stamp at every write (any clock).
            beat = record.get("beat", record.get("updated"))
            key = (record.get("run_id"), record.get("host"), record.get("pid"), beat)
            seen = self._seen.get(rank)
            if seen is None or seen[0] != key:
                seen = self._seen[rank] = (key, now)
            silence[rank] = now - seen[1]
        return silence


class RankStatus:
    """This rank's status file, heartbeat and watchdog over the other ranks."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        run_id: str = "",
        heartbeat_s: float | None = None,
        breakdown_steps: int = 2,
        abort_after_s: float | None = None,
    ):
        if heartbeat_s is None:
            heartbeat_s = env_seconds("ADAPONDER_HEARTBEAT_S", 2.0)
        if abort_after_s is None:
            abort_after_s = env_seconds("ADAPONDER_ABORT_AFTER_S", 60.0)
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.path = status_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._heartbeat_s, self._breakdown_steps, self._abort_after_s = (
            heartbeat_s,
            breakdown_steps,
            abort_after_s,
        )
        self._device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._lock = threading.Lock()  # the record, shared by the training thread and the writer
        # Orders the writes: the record is read inside it, so the last write holds the latest record.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._record: dict[str, Any] = {
            "rank": rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "run_id": run_id,
            "beat": 0,
            "started": time.time(),
            "baseline_rss_gib": resident_gib(),  # before the model is built
            **{
                f"baseline_{k}": v
                for k, v in memory_now().items()
                if k.endswith("_rss_gib") and "peak" not in k
            },
            "breakdown": {},
        }
        self.run_id = run_id
        self.stale_s = STALE_BEATS * heartbeat_s
        self._peers = PeerWatch()
        self._peers_lock = threading.Lock()  # the watchdog thread and a failing training thread
        self._reported = False
        self._write_failures = 0
        self._stop = threading.Event()
        self.enter("init")
        self._try_flush()  # the launch is on disk before anything else can fail
        self._thread = threading.Thread(target=self._watch, name="rank-status", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------
    # This rank.

    def enter(self, phase: str, step: int | None = None, micro: int | None = None) -> None:
        """Start `phase` of `step` / `micro`, in memory only: the heartbeat thread writes it.

        Between two micro-batch phases after the first `breakdown_steps` steps that is all (no I/O);
        otherwise the closing phase's memory is measured (/proc), the peaks are reset and the thread
        is woken to write the file at once."""
        with self._lock:
            current = self._record.get("step"), self._record.get("micro")
            notable = not (self._routine(step, micro) and self._routine(*current))
            if notable:
                self._close_phase()
                _reset_peak(self._device)
            self._record.update(phase=phase, step=step, micro=micro, since=time.time())
        if notable:
            self._wake.set()

    def _routine(self, step: int | None, micro: int | None) -> bool:
        """A phase of a micro-batch after the breakdown steps: the steady state of training."""
        return micro is not None and step is not None and step > self._breakdown_steps

    def finish(self, error: BaseException | None = None) -> None:
        """The rank leaves: cleanly ("exited") or with `error` ("failed"), which the others report."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._close_phase()
            if error is not None:
                self._record["failed_in"] = {k: self._record.get(k) for k in ("phase", "step", "micro")}
                self._record["error"] = f"{type(error).__name__}: {error}"[:2000]
            self._record.update(phase="failed" if error is not None else "exited", since=time.time())
        self._try_flush()

    def describe_self(self) -> str:
        with self._lock:
            return describe_rank(dict(self._record))

    def _close_phase(self) -> None:
        phase = self._record.get("phase")
        if phase is None or phase in FINISHED:
            return
        figures = memory_now(self._device)
        _note_peaks(figures)
        step = self._record.get("step")
        if step is None or step <= self._breakdown_steps:
            key = phase if step is None else f"{phase}@{step}"
            kept = self._record["breakdown"].setdefault(key, {})
            for name, value in figures.items():
                kept[name] = max(kept.get(name, 0.0), value)

    def _flush(self) -> None:
        """Write the record with the memory figures of now."""
        with self._write_lock:
            figures = memory_now(self._device)
            with self._lock:  # serialized inside: enter() may change the record (its breakdown too)
                _note_peaks(figures)
                self._record["beat"] += 1
                self._record.update(figures, run_peak_rss_gib=_RUN_PEAK["peak_rss_gib"], updated=time.time())
                if torch.cuda.is_available():
                    self._record["run_peak_device_gib"] = _RUN_PEAK["device_peak_gib"]
                text = json.dumps(self._record, indent=1)
            _write_json(self.path, text)

    # ----------------------------------------------------------------------------------------------
    # The other ranks.

    def _try_flush(self) -> None:
        """Write the record; a failed write is logged (its first and every 100th) and left to the
        next heartbeat, never raised: the status file serves the run, it must not end it."""
        try:
            self._flush()
        except Exception as e:  # OSError mostly (quota, full disk, NFS); whatever it is, go on
            self._write_failures += 1
            if self._write_failures % 100 == 1:
                print(
                    f"[rank {self.rank}] could not write its status file {self.path} "
                    f"({type(e).__name__}: {e}); retrying at the next heartbeat "
                    f"({self._write_failures} failed so far)",
                    file=sys.stderr,
                    flush=True,
                )
        else:
            if self._write_failures:
                print(
                    f"[rank {self.rank}] status file written again after {self._write_failures} "
                    "failed writes",
                    file=sys.stderr,
                    flush=True,
                )
            self._write_failures = 0

    def _watch(self) -> None:
        """Write this rank's file when woken and at every heartbeat; then look at the other ranks.
        Nothing that goes wrong in one round ends the thread: the next heartbeat tries again."""
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()  # before the write, which then holds whatever woke it
            if self._stop.is_set():
                return
            self._try_flush()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._heartbeat_s
                try:
                    self._check_peers()
                except Exception as e:
                    print(
                        f"[rank {self.rank}] could not check the other ranks ({type(e).__name__}: {e})",
                        file=sys.stderr,
                        flush=True,
                    )

    def peer_report(self) -> tuple[str | None, list[int]]:
        """The report naming every other rank that is gone (with their ranks), or (None, [])."""
        statuses = read_statuses(self.run_dir, self.run_id)
        with self._peers_lock:
            silence = self._peers.observe(statuses)
        return _peer_report(statuses, self.rank, self.world_size, self.stale_s, silence)

    def _check_peers(self) -> None:
        if self._reported:
            return
        report, gone = self.peer_report()
        if report is not None:
            self.report(report)
            threading.Thread(target=self._abort_later, args=(gone,), daemon=True).start()

    def failure_report(self, wait_s: float | None = None) -> str:
        """For this rank, which caught an error: the other ranks' fate. A peer on another host is
        judged by its heartbeat, so wait up to `wait_s` (default: the silence that marks it gone)
        for one to be seen gone; else their last status."""
        deadline = time.monotonic() + (self.stale_s + self._heartbeat_s if wait_s is None else wait_s)
        while True:
            report, _ = self.peer_report()
            if report is not None:
                return report
            if self.world_size <= 1 or time.monotonic() >= deadline:
                break
            time.sleep(min(self._heartbeat_s, 1.0))
        statuses = read_statuses(self.run_dir, self.run_id)
        others = [describe_rank(statuses[r]) for r in sorted(statuses) if r != self.rank]
        return "no other rank is known to have failed; their last status: " + ("; ".join(others) or "none")

    def report(self, text: str) -> None:
        """Print the failure report once (stderr, through the launcher) and keep it in the run dir."""
        if self._reported:
            return
        self._reported = True
        print(f"[rank {self.rank}] {text}", file=sys.stderr, flush=True)
        try:
            with open(self.run_dir / STATUS_DIR / "failure.txt", "a") as f:
                f.write(f"[reported by rank {self.rank} at {time.strftime('%Y-%m-%d %H:%M:%S')}]\n{text}\n")
        except OSError:
            pass

    def _progress(self) -> tuple:
        with self._lock:
            return tuple(self._record.get(k) for k in ("phase", "step", "micro"))

    def _abort_later(self, gone: list[int]) -> None:
        """A collective with a dead peer can hang for the backend's timeout (NCCL: 30 min): leave,
        but only if the peer is still gone and this rank has not moved on meanwhile (it could not,
        were the peer really gone)."""
        before = self._progress()
        if self._stop.wait(self._abort_after_s):
            return
        try:
            _, still_gone = self.peer_report()
        except Exception:
            still_gone = gone  # the run directory cannot be read: judge by this rank's progress alone
        if self._progress() != before or not set(gone) & set(still_gone):
            print(
                f"[rank {self.rank}] not exiting: rank(s) {', '.join(map(str, gone))} reported above "
                "are running again or this rank has made progress since",
                file=sys.stderr,
                flush=True,
            )
            self._reported = False  # report again should it really go
            return
        names = ", ".join(map(str, sorted(set(gone) & set(still_gone))))
        print(
            f"[rank {self.rank}] exiting: rank {names} is gone and this rank has not returned from "
            f"'{self._record.get('phase')}' in {self._abort_after_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def read_statuses(run_dir: Path, run_id: str | None = None) -> dict[int, dict[str, Any]]:
    """Every rank's last status (of this run only, when `run_id` is given: a resumed run's
    directory still holds the previous job's files until each rank writes its own)."""
    statuses = {}
    for path in sorted((Path(run_dir) / STATUS_DIR).glob("rank-*.json")):
        try:
            record = json.loads(path.read_text())
            int(record["rank"])
        except (OSError, ValueError, TypeError, KeyError):  # torn or foreign: not a status
            continue
        if run_id is None or record.get("run_id") == run_id:
            statuses[int(record["rank"])] = record
    return statuses


def _process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has died; its parent has not collected it yet


def rank_gone(record: dict[str, Any], stale_s: float, silent_s: float | None = None) -> str | None:
    """Why a rank that has not exited cleanly is no longer running, or None while it runs.
    `silent_s`: how long its heartbeat has been seen unchanged on this host's clock (None: not
    observed, so a rank on another host counts as running)."""
    if record.get("phase") == "failed":
        return "failed"
    if record.get("phase") == "exited":
        return None
    if same_host(record):
        return None if _process_alive(int(record["pid"])) else "died"
    if silent_s is not None and silent_s > stale_s:
        return f"silent for {silent_s:.0f} s (no heartbeat seen on this host's clock)"
    return None


def describe_rank(record: dict[str, Any], silent_s: float | None = None) -> str:
    where = record.get("failed_in") or record
    doing = where.get("phase")
    if where.get("step") is not None:
        doing = f"{doing} of step {where['step']}"
    if where.get("micro") is not None:
        doing += f", micro-batch {where['micro']}"
    # Durations from the record's own stamps are only meaningful on the clock that wrote them.
    local = same_host(record)
    since = time.time() - float(record.get("since", time.time())) if local else 0.0
    ago = f"{time.time() - float(record.get('updated', 0)):.0f} s ago" if local else None
    if silent_s is not None:
        ago = f"{silent_s:.0f} s ago"
    text = (
        f"rank {record['rank']} (pid {record['pid']} on {record['host']}) was in {doing}; "
        f"resident memory {record.get('rss_gib', 0):.2f} GiB at its last report"
        + (f" ({ago})" if ago else "")
        + f", peak {record.get('run_peak_rss_gib', 0):.2f} GiB"
    )
    if "run_peak_device_gib" in record:
        text += f", accelerator peak {record['run_peak_device_gib']:.2f} GiB"
    if record.get("phase") == "failed":
        text += f"; it failed with {record.get('error')}"
    elif since > 0 and record.get("phase") not in FINISHED:
        text += f"; {since:.0f} s in that phase"
    return text


def _peer_report(
    statuses: dict[int, dict[str, Any]],
    rank: int,
    world_size: int,
    stale_s: float,
    silence: dict[int, float] | None = None,
) -> tuple[str | None, list[int]]:
    silence = silence or {}
    gone = []
    for other in range(world_size):
        if other == rank or other not in statuses:
            continue
        why = rank_gone(statuses[other], stale_s, silence.get(other))
        if why is not None:
            gone.append((other, why))
    if not gone:
        return None, []
    lines = []
    for other, why in gone:
        record = statuses[other]
        cause = why
        if why == "died":
            cause = (
                "died (its process is gone: a SIGKILL, e.g. the kernel's OOM killer, leaves no error; "
                "see dmesg)"
            )
        lines.append(f"rank {other} {cause}: {describe_rank(record, silence.get(other))}")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB if hasattr(os, "sysconf") else 0
    lines.append(
        f"host memory {total:.1f} GiB; this rank ({rank}) holds {resident_gib():.2f} GiB; "
        "a collective error on the surviving ranks follows from this"
    )
    return "\n".join(lines), [other for other, _ in gone]


def peer_failure_report(
    run_dir: Path,
    rank: int,
    world_size: int,
    stale_s: float,
    run_id: str | None = None,
    silence: dict[int, float] | None = None,
) -> str | None:
    """A report naming every other rank that has died or failed, or None while all run. A rank on
    another host counts as gone only when `silence` (seconds its heartbeat has been seen unchanged,
    on this host's clock: PeerWatch) says so."""
    return _peer_report(read_statuses(run_dir, run_id), rank, world_size, stale_s, silence)[0]
