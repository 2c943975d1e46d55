"""The paper's claims at small scale, one command (experiments/README.md has the results).

    python -m experiments.study run                # the full study, in the foreground
    python -m experiments.study run --background   # the same, detached, niced, logging to WORK/study.log
    python -m experiments.study status             # which runs are trained / evaluated
    python -m experiments.study report             # README.md, table and plots from the result files
    python -m experiments.study run --smoke        # the whole pipeline at toy size (a few minutes)
    python -m experiments.study run --train-only --background   # train now, evaluate in a later run
    python -m experiments.study run --pilot --arms vanilla,ponderlm --background   # the regime pilot
    python -m experiments.study run --scale pilot2 --arms vanilla,ponderlm --background   # its second regime

    # Reproduction: seed 1 again from scratch in a fresh work directory, then compared run by run
    python -m experiments.study run --background --seeds 1 --work experiments/work/rerun
    python -m experiments.study compare --rerun experiments/work/rerun

`run` builds the corpus, tokenizer and shards (each skipped when present), then trains every arm and
seed with `training/pretrain.py` (one process per run, `--jobs` at a time; a continued arm once its
source run is trained, a tuned arm's later seeds once its tuning runs are), evaluates each finished
run, and writes the report. It resumes wherever it stopped: a trained run is not retrained, an
evaluated run is not re-evaluated, and an interrupted run continues from its last checkpoint (the
trainer's own resume). Run state (corpus, runs, checkpoints, logs) lives under WORK (ignored by git);
results (per-run JSON, table, plots, README) under OUT.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from experiments.arms import (
    EXIT_BASELINES,
    PILOTS,
    SCALES,
    Arm,
    Scale,
    arm_named,
    arms,
    jobs,
    run_config,
    run_name,
    train_steps,
)
from experiments.corpus import TRAIN_PACKAGES, VALID_PACKAGES, SplitSpec, write_split, write_synthetic
from experiments.downstream import TASKS

EXPERIMENTS = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS.parent
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


class Layout:
    """Where everything of one study lives."""

    def __init__(self, scale: Scale, work: Path, out: Path):
        self.scale, self.work, self.out = scale, work, out
        self.data = work / "data"
        self.runs = work / "runs"
        self.logs = work / "logs"
        self.results = out / "results"

    def data_paths(self) -> dict[str, str]:
        paths = {
            "train": str(self.data / "train"),
            "valid": str(self.data / "valid"),
            "tokenizer": str(self.data / "tokenizer"),
        }
        if self.scale.synthetic_valid_bytes:
            paths["valid_synthetic"] = str(self.data / "valid_synthetic")
        return paths

    def validation_shards(self) -> dict[str, str]:
        """The validation shards by name: the code packages never trained on, then the programs."""
        paths = self.data_paths()
        shards = {"code": paths["valid"]}
        if "valid_synthetic" in paths:
            shards["programs"] = paths["valid_synthetic"]
        return shards

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    def shown(self, path: Path) -> Path:
        """`path` as the report names it: relative to OUT's parent (the repository) when below it."""
        try:
            return path.relative_to(self.out.parent)
        except ValueError:
            return path

    def result_file(self, name: str) -> Path:
        return self.results / "by_run" / f"{name}.json"  # not "runs/": .gitignore ignores that name


def write_report(layout: Layout) -> Path:
    """README.md, table and plots of the study, or the pilot's own report."""
    if layout.scale.name in PILOTS:
        from experiments.pilot import write_pilot_report as writer
    else:
        from experiments.report import write_report as writer
    return writer(layout)


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Data: corpus split by package, BPE on the training split, MMIDIDX shards.


def prepare_data(layout: Layout) -> dict[str, Any]:
    """Build what is missing; return the corpus facts (also in data/corpus.json)."""
    from data.indexed import index_path
    from data.preprocess import preprocess
    from data.train_tokenizer import train_tokenizer
    from training.checkpoint import sha256_file

    scale, data = layout.scale, layout.data
    facts_file = data / "corpus.json"
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    splits = (
        SplitSpec("train", TRAIN_PACKAGES, scale.train_bytes),
        SplitSpec("valid", VALID_PACKAGES, scale.valid_bytes),
    )
    for spec in splits:
        if not (data / f"{spec.name}.jsonl").is_file():
            facts[spec.name] = {
                "packages": list(spec.packages),
                **write_split(spec, data / f"{spec.name}.jsonl"),
            }
            log(f"corpus {spec.name}: {facts[spec.name]}")
    synthetic = {
        "train_synthetic": scale.synthetic_train_bytes,
        "valid_synthetic": scale.synthetic_valid_bytes,
    }
    for seed, (name, size) in enumerate(synthetic.items(), start=1):
        if size and not (data / f"{name}.jsonl").is_file():
            facts[name] = write_synthetic(data / f"{name}.jsonl", size, seed)
            log(f"corpus {name}: {facts[name]}")
    train_text = [str(data / "train.jsonl")]
    if scale.synthetic_train_bytes:
        train_text.append(str(data / "train_synthetic.jsonl"))
    tokenizer = data / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer(train_text, "bpe", scale.vocab_size, str(tokenizer))
        log(f"tokenizer: byte-level BPE, {scale.vocab_size} tokens, trained on the train split")
    shards = {"train": train_text, "valid": [str(data / "valid.jsonl")]}
    if scale.synthetic_valid_bytes:
        shards["valid_synthetic"] = [str(data / "valid_synthetic.jsonl")]
    for name, sources in shards.items():
        if not Path(index_path(data / name)).is_file():
            stats = preprocess(sources, str(tokenizer), str(data / name), progress=False)
            facts.setdefault(name, {})["tokens"] = stats.tokens
            log(f"shards {name}: {stats.tokens:,} tokens")
    if scale.task_examples and not (data / "tasks" / "ponder_realline.yaml").is_file():
        from experiments.downstream import write_tasks

        write_tasks(data, data / "tasks", scale.task_examples)
        log(f"downstream tasks: {scale.task_examples} questions each in {data / 'tasks'}")
    # What a rerun from scratch must rebuild byte for byte (`compare` checks it).
    built = [
        "train.jsonl",
        "valid.jsonl",
        "tokenizer/tokenizer.json",
        *(f"{name}.jsonl" for name, size in synthetic.items() if size),
        *(f"{name}.{ext}" for name in shards for ext in ("bin", "idx")),
        *(f"tasks/{task}.jsonl" for task in TASKS if scale.task_examples),
    ]
    facts["sha256"] = {name: sha256_file(data / name) for name in built}
    facts_file.write_text(json.dumps(facts, indent=1))
    layout.results.mkdir(parents=True, exist_ok=True)
    (layout.results / "corpus.json").write_text(json.dumps(facts, indent=1))  # for the report
    return facts


# --------------------------------------------------------------------------------------------------
# One run: train (resuming), export, evaluate. Runs in its own process (`_task`).


def trained(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    done = json.loads(summary.read_text())
    return done["status"] in ("finished", "already complete") and done["step"] >= steps


def run_trained(layout: Layout, arm: Arm, seed: int) -> bool:
    return trained(layout.run_dir(run_name(arm, seed)), train_steps(arm, layout.scale))


def needs(layout: Layout, arm: Arm, seed: int) -> list[tuple[Arm, int]]:
    """The runs that must be trained before this one starts: a continued arm's source; the tuning
    runs (first seed) that choose a tuned arm's learning rate."""
    scale = layout.scale
    if arm.continues:
        return [(arm_named(scale, arm.continues), seed)]
    return [(arm_named(scale, name), scale.seeds[0]) for name in arm.tuned_by]


def final_loss(layout: Layout, arm: Arm, seed: int) -> float:
    """The trainer's own validation loss at the end of a run (summary.json's `eval`)."""
    summary = json.loads((layout.run_dir(run_name(arm, seed)) / "summary.json").read_text())
    return summary["eval"]["lm_loss"]


def tuned_choice(layout: Layout, arm: Arm) -> Arm:
    """The tuning arm of `arm` with the lowest final validation loss on the first seed."""
    seed = layout.scale.seeds[0]
    return min(
        (arm_named(layout.scale, name) for name in arm.tuned_by), key=lambda a: final_loss(layout, a, seed)
    )


def source_export(layout: Layout, arm: Arm, seed: int) -> Path:
    """The continued arm's source run, exported once as a Hugging Face directory under WORK/exports."""
    from training.export import export_checkpoint

    source = run_name(arm_named(layout.scale, arm.continues), seed)
    out = layout.work / "exports" / source
    if not (out / "export_info.json").is_file():
        info = export_checkpoint(layout.run_dir(source), out, tokenizer=layout.data_paths()["tokenizer"])
        log(f"{source}: step {info['step']} exported to {out} for {run_name(arm, seed)}")
    return out


def _train_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config without its paths, so that a work directory can be moved and resumed."""
    data = {k: v for k, v in cfg["data"].items() if k not in ("train_paths", "valid_paths", "tokenizer")}
    model = {k: v for k, v in cfg["model"].items() if k != "init_from"}
    return {k: v for k, v in cfg.items() if k != "run_dir"} | {"data": data, "model": model}


def checked_config(layout: Layout, arm: Arm, seed: int) -> Path:
    """Write the run's config, or check it against the one the run was started with.

    A finished run is never retrained, so a study whose arms changed since must not reuse it as if
    it were the new arm: that is an error naming the run to delete.
    """
    name = run_name(arm, seed)
    path = layout.work / "configs" / f"{name}.yaml"
    source = str(source_export(layout, arm, seed)) if arm.continues else None
    lr = None
    if arm.tuned_by:
        lr = run_config(tuned_choice(layout, arm), seed, layout.scale, "", layout.data_paths())["optimizer"][
            "lr"
        ]
    cfg = run_config(arm, seed, layout.scale, str(layout.run_dir(name)), layout.data_paths(), source, lr)
    if path.is_file() and _settings(yaml.safe_load(path.read_text())) != _settings(cfg):
        raise ValueError(
            f"{name}: its arm's config changed since it was started ({path}); delete "
            f"{layout.run_dir(name)} and {path} to train it again, or restore the old settings"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(layout: Layout, name: str, config: Path, exit_at_step: int | None, lock_fd: int) -> None:
    """Train (or resume) one run; its wall time is added to `wall.json` in the run directory (an
    invocation killed with its task, which could not record itself, is counted by the next one)."""
    run_dir = layout.run_dir(name)
    command = [sys.executable, str(REPO_ROOT / "training" / "pretrain.py"), "--config", str(config)]
    if exit_at_step is not None:
        command.append(f"exit_at_step={exit_at_step}")
    layout.logs.mkdir(parents=True, exist_ok=True)
    wall_file = run_dir / "wall.json"
    wall = json.loads(wall_file.read_text()) if wall_file.is_file() else {"seconds": 0.0, "invocations": 0}
    if "open_since" in wall:  # the last invocation was killed: count it until its log's last line
        last_output = (layout.logs / f"{name}.log").stat().st_mtime
        wall["seconds"] += max(0.0, last_output - wall.pop("open_since"))
        wall["invocations"] += 1
    wall_file.write_text(json.dumps(wall | {"open_since": time.time()}))
    started = time.perf_counter()
    with open(layout.logs / f"{name}.log", "a") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(
            command,
            env=_train_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            pass_fds=(lock_fd,),
        )
    wall["seconds"] += time.perf_counter() - started
    wall["invocations"] += 1
    wall_file.write_text(json.dumps(wall))
    if result.returncode != 0:
        raise RuntimeError(f"training {name} failed (exit {result.returncode}); see {layout.logs / name}.log")


def evaluate(layout: Layout, arm: Arm, seed: int) -> None:
    """Evaluate the final checkpoint and write the run's result JSON."""
    import torch

    from experiments.evaluate import Sweeps, evaluate_run

    # One core per run, like its training: two OpenMP threads beside another job on 2 cores spin at
    # their barriers (an evaluation took 16 minutes that way).
    torch.set_num_threads(1)
    name = run_name(arm, seed)
    scale, run_dir = layout.scale, layout.run_dir(name)
    started = time.perf_counter()
    sweeps = Sweeps(scale.taus, scale.pass_grid, scale.confidences, scale.draws)
    baselines = arm.name in EXIT_BASELINES.values()
    settings = (scale.seq_len, scale.eval_windows, scale.sweep_windows, scale.eval_batch, sweeps, baselines)
    result = evaluate_run(run_dir, layout.validation_shards(), *settings)
    if scale.task_examples:
        result["tasks"] = downstream(run_dir, layout, scale.eval_batch)
    summary = json.loads((run_dir / "summary.json").read_text())
    result.update(
        arm=arm.name,
        seed=seed,
        train_tokens=summary["consumed_tokens"],
        train_steps=summary["step"],
        train_wall_seconds=json.loads((run_dir / "wall.json").read_text())["seconds"],
        train_tokens_per_sec=summary["tokens_per_sec"],
        eval_wall_seconds=time.perf_counter() - started,
        trainer_eval=summary["eval"],
    )
    result["training_curve"] = training_curve(run_dir)
    write_result(layout.result_file(name), result)


def downstream(run_dir: Path, layout: Layout, batch: int) -> dict[str, Any]:
    """Accuracy and passes of each downstream task at the model's trained halting threshold."""
    from training.evaluate import evaluate_tasks, load_model, load_tokenizer

    model, _, _ = load_model(run_dir)
    tokenizer = load_tokenizer(layout.data_paths()["tokenizer"])
    include = str(layout.data / "tasks")
    scores = evaluate_tasks(model, tokenizer, list(TASKS), include_path=include, batch_size=batch)
    return {
        task: {"acc": s["metrics"]["acc,none"], "mean_passes": s["mean_passes"], "tokens": s["tokens"]}
        for task, s in scores.items()
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


CURVE_TAGS = {
    "mean_passes": "ponder/mean_passes",
    "ponder_loss": "train/ponder_loss",
    "lm_loss": "train/lm_loss",
}
GATE_TAG = "ponder/gate_values/"


def training_curve(run_dir: Path) -> dict[str, list[list[float]]]:
    """[step, value] pairs of the logged mean passes, ponder loss and LM loss (TensorBoard scalars),
    and of each gate's mean value (`gate_mean_U`, from its histogram): when the gates began to halt
    tokens, and whether the ponder loss ever had work to do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "histograms": 0}
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance=guidance)
    events.Reload()
    curve = {}
    for key, tag in CURVE_TAGS.items():
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run logs some steps twice
        curve[key] = [[step, by_step[step]] for step in sorted(by_step)]
    for tag in sorted(t for t in events.Tags()["histograms"] if t.startswith(GATE_TAG)):
        by_step = {e.step: e.histogram_value.sum / e.histogram_value.num for e in events.Histograms(tag)}
        curve[f"gate_mean_{tag.removeprefix(GATE_TAG)}"] = [[step, by_step[step]] for step in sorted(by_step)]
    return curve


def backfill_training_curve(layout: Layout, name: str) -> bool:
    """Add the training curve to a result written before results carried one (from its run's logs)."""
    path = layout.result_file(name)
    result = json.loads(path.read_text())
    tensorboard = layout.run_dir(name) / "tensorboard"
    if "training_curve" in result or not tensorboard.is_dir():
        return False
    result["training_curve"] = training_curve(layout.run_dir(name))
    write_result(path, result)
    return True


def task(layout: Layout, arm: Arm, seed: int, exit_at_step: int | None, evaluate_it: bool = True) -> str:
    """Bring one run as far as it goes: trained, then evaluated. Returns what was done.

    A lock per run, held by this process and inherited by its trainer, keeps a second study (or a
    trainer orphaned by a killed one) from ever training the same run directory twice at once.
    """
    name = run_name(arm, seed)
    if layout.result_file(name).is_file():
        return "done (training curve added)" if backfill_training_curve(layout, name) else "done"
    run_dir = layout.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    # SIGTERM goes to the whole task group: the trainer checkpoints and exits; this process waits
    # for it, records its time and starts nothing new.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with open(run_dir / "study.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"{name}: another process is training it (lock {run_dir / 'study.lock'})"
            ) from None
        config = checked_config(layout, arm, seed)
        if not run_trained(layout, arm, seed):
            train(layout, name, config, exit_at_step, lock.fileno())
            if not run_trained(layout, arm, seed):
                return "stopped before the end (resumes from its checkpoint)"
        if stop.is_set() or not evaluate_it:
            return "trained; evaluation left for the next run of the study"
        evaluate(layout, arm, seed)
    return "trained and evaluated"


# --------------------------------------------------------------------------------------------------
# The study: every run, `jobs` at a time, each in its own process; then the report.


class Runner:
    """Runs the per-run tasks as child processes; forwards SIGTERM/SIGINT so the trainers checkpoint."""

    def __init__(self, base_args: list[str]):
        self.base_args = base_args
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, name: str) -> int:
        with self.lock:
            if self.stopping:
                return 1
            # Its own process group (task + trainer), so that stop() reaches both.
            proc = subprocess.Popen(
                [sys.executable, "-m", "experiments.study", "_task", name, *self.base_args],
                cwd=REPO_ROOT,
                env=_train_env(),
                process_group=0,
            )
            self.children.add(proc)
        code = proc.wait()
        with self.lock:
            self.children.discard(proc)
        return code

    def stop(self, signum: int, frame: Any) -> None:
        log(f"signal {signal.Signals(signum).name}: stopping runs (each checkpoints and exits)")
        with self.lock:
            self.stopping = True
            for proc in self.children:
                os.killpg(proc.pid, signal.SIGTERM)


def run_study(
    layout: Layout, jobs_at_once: int, base_args: list[str], only: list[str] | None, seeds: list[int] | None
) -> int:
    prepare_data(layout)
    todo = jobs(layout.scale, only, seeds)
    runner = Runner(base_args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, runner.stop)
    log(f"{len(todo)} runs, {jobs_at_once} at a time: {', '.join(run_name(a, s) for a, s in todo)}")
    codes = schedule(layout, todo, jobs_at_once, runner)
    failed = [n for n, c in codes.items() if c != 0]
    write_report(layout)
    log(f"report: {layout.out / 'README.md'}")
    if failed:
        log(f"failed, stopped or not started: {', '.join(failed)} (logs in {layout.logs})")
        return 1
    return 0


def schedule(layout: Layout, todo: list[tuple[Arm, int]], at_once: int, runner: Runner) -> dict[str, int]:
    """Run the tasks `at_once` at a time, in order, each once the runs it needs are trained.

    A task whose needed run is neither trained nor among the tasks, or whose needed run failed, is not
    started (exit code 1 recorded, and why logged).
    """
    pending = list(todo)
    queued = {run_name(a, s) for a, s in todo}
    codes: dict[str, int] = {}
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(at_once) as pool:
        while pending or running:
            for arm, seed in list(pending):
                if len(running) >= at_once:
                    break
                name = run_name(arm, seed)
                waiting = [(a, s) for a, s in needs(layout, arm, seed) if not run_trained(layout, a, s)]
                lost = [
                    run_name(a, s)
                    for a, s in waiting
                    if run_name(a, s) not in queued or codes.get(run_name(a, s), 0) != 0
                ]
                if lost or runner.stopping:
                    pending.remove((arm, seed))
                    codes[name] = 1
                    if lost and not runner.stopping:
                        log(f"{name}: not started, it needs {', '.join(lost)} trained first")
                elif not waiting:
                    pending.remove((arm, seed))
                    running[pool.submit(runner.run, name)] = name
            if not running:
                if pending:  # every pending task waits on a run that will never be trained
                    for arm, seed in pending:
                        codes[run_name(arm, seed)] = 1
                    names = ", ".join(run_name(a, s) for a, s in pending)
                    log(f"not started (their needed runs are missing): {names}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                codes[running.pop(future)] = future.result()
    return codes


def resumes(layout: Layout, name: str) -> int | None:
    """How often the run's trainer resumed from a checkpoint (its log's "resumed from" lines)."""
    path = layout.logs / f"{name}.log"
    if not path.is_file():
        return None
    with open(path, errors="replace") as log_file:
        return sum(line.startswith("resumed from ") for line in log_file)


def compare_rerun(layout: Layout, rerun_work: Path) -> int:
    """Compare the results of a rerun in `rerun_work` (its OUT: WORK/out) with this study's; record
    the comparison for the report."""
    from experiments.reproduce import compare, reproduced, table

    rerun = Layout(layout.scale, rerun_work, rerun_work / "out")
    comparison = compare(layout.results, rerun.results)
    for r in comparison["runs"]:
        r["resumes_reference"], r["resumes_rerun"] = resumes(layout, r["run"]), resumes(rerun, r["run"])
    comparison["rerun"] = str(layout.shown(rerun_work))
    write_result(layout.results / "reproduction.json", comparison)
    print(f"data: {comparison['data']}")
    print("\n".join(table(comparison)))
    write_report(layout)
    return 0 if reproduced(comparison) else 1


def locked(run_dir: Path) -> bool:
    """Whether a task holds the run's lock (it is training or evaluating now)."""
    if not (run_dir / "study.lock").is_file():
        return False
    with open(run_dir / "study.lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def status(layout: Layout) -> None:
    for arm, seed in jobs(layout.scale):
        name = run_name(arm, seed)
        run_dir = layout.run_dir(name)
        if layout.result_file(name).is_file():
            state = "evaluated"
        elif run_trained(layout, arm, seed):
            state = "trained, not evaluated"
        elif locked(run_dir):
            state = "training now"
        elif (run_dir / "checkpoints" / "latest").is_file():
            state = f"stopped at {(run_dir / 'checkpoints' / 'latest').read_text().strip()}"
        else:
            state = "not started"
        print(f"{name:24s} {state}")


def start_background(argv: list[str], layout: Layout) -> int:
    layout.work.mkdir(parents=True, exist_ok=True)
    log_file = layout.work / "study.log"
    args = [a for a in argv if a != "--background"]
    with open(log_file, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.study", *args],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: os.nice(19),
        )
    print(f"study running in the background, pid {proc.pid}, log {log_file}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command", choices=("run", "status", "report", "compare", "_task"), nargs="?", default="run"
    )
    parser.add_argument("name", nargs="?", help=argparse.SUPPRESS)  # the run of `_task`
    parser.add_argument("--smoke", action="store_true", help="toy sizes: the whole pipeline in a few minutes")
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="the first regime pilot (--scale pilot; results in experiments/pilot)",
    )
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        help="the study's scale (default full); the pilots write their results to experiments/SCALE",
    )
    parser.add_argument("--work", help="run state (default experiments/work/SCALE)")
    parser.add_argument(
        "--out", help="results and README (default: experiments/ for the full study in its WORK, or WORK/out)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at the same time (one core each)")
    parser.add_argument("--exit-at-step", type=int, help="stop every run at this step (resumable chunks)")
    parser.add_argument(
        "--train-only", action="store_true", help="train the runs, evaluate none (a later run evaluates them)"
    )
    parser.add_argument("--arms", help="comma-separated arm names to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: all of the scale's)")
    parser.add_argument("--background", action="store_true", help="detach, nice 19, log to WORK/study.log")
    parser.add_argument("--rerun", help="compare: the WORK directory of a rerun of this study from scratch")
    return parser.parse_args(argv)


def layout_of(args: argparse.Namespace) -> Layout:
    scale = SCALES[args.scale or ("smoke" if args.smoke else "pilot" if args.pilot else "full")]
    default_work = (EXPERIMENTS / "work" / scale.name).resolve()
    work = Path(args.work or default_work).resolve()
    # Only the full study and the pilot in their own work directories write the committed results: a
    # rerun elsewhere must not find them and take its runs for done.
    committed = {"full": EXPERIMENTS, **{name: EXPERIMENTS / name for name in PILOTS}}.get(scale.name)
    out = committed if committed is not None and work == default_work else work / "out"
    return Layout(scale, work, Path(args.out or out).resolve())


def _seeds(text: str | None, scale: Scale) -> list[int] | None:
    """`--seeds` as a list (None: all); [] after printing why it is not one of the scale's seeds."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or not set(seeds) <= set(scale.seeds):
        print(f"--seeds: {text!r} is not a comma-separated subset of {list(scale.seeds)}", file=sys.stderr)
        return []
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    layout = layout_of(args)
    scale, work, out = layout.scale, layout.work, layout.out
    if args.command == "status":
        status(layout)
        return 0
    if args.command == "report":
        write_report(layout)
        return 0
    if args.command == "compare":
        if not args.rerun:
            print("compare needs --rerun WORK (the work directory of a rerun)", file=sys.stderr)
            return 2
        return compare_rerun(layout, Path(args.rerun).resolve())
    if args.command == "_task":
        arm, seed = next((a, s) for a, s in jobs(scale) if run_name(a, s) == args.name)
        log(f"{args.name}: {task(layout, arm, seed, args.exit_at_step, not args.train_only)}")
        return 0
    seeds = _seeds(args.seeds, scale)
    if seeds == []:
        return 2
    if args.background:
        return start_background(argv, layout)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "study.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another study is running on {work} (lock {work / 'study.lock'})", file=sys.stderr)
            return 2
        base = ["--work", str(work), "--out", str(out), "--scale", scale.name]
        if args.exit_at_step is not None:
            base += ["--exit-at-step", str(args.exit_at_step)]
        if args.train_only:
            base.append("--train-only")
        only = args.arms.split(",") if args.arms else None
        unknown = sorted(set(only or []) - {a.name for a in arms(scale)})
        if unknown:
            print(f"--arms: unknown arms {unknown}; known: {[a.name for a in arms(scale)]}", file=sys.stderr)
            return 2
        return run_study(layout, args.jobs, base, only, seeds)


if __name__ == "__main__":
    sys.exit(main())
