"""`adaponder-quickstart`: the whole life of a run in a few minutes, with no download and no GPU.

1. data: a corpus of real text every machine has (the Python standard library's sources,
   data.builtin_corpus), a byte-level BPE tokenizer trained on it, MMIDIDX shards;
2. training: ZeRO-3 on 2 ranks (CPU unless a GPU is present) through the `deepspeed` launcher
   (configs/quickstart.yaml), with TensorBoard and CSV metrics and checkpoints under the run directory;
3. a preemption half-way: SIGUSR1 to the ranks, which finish the step, checkpoint and exit 0;
4. the same command again, which resumes from the run's own checkpoint and finishes;
5. export of the last checkpoint to a Hugging Face directory;
6. evaluation of the export on the held-out validation documents (`adaponder-eval`);
7. a generated sample with the passes each token took;
8. where everything is.

Steps whose outputs exist are skipped and training resumes from its own checkpoint, so running it
again continues (or just reports) the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer

from data.builtin_corpus import build_builtin_corpus
from data.indexed import index_path
from data.preprocess import preprocess
from data.train_tokenizer import train_tokenizer
from launcher import generate
from training import evaluate as evaluation
from training import pretrain
from training.config import RunConfig, read_config, resolve_path
from training.export import export_checkpoint

PROMPT = "def __init__(self"
_STEP_LINE = re.compile(r"(?:^|\s)step (\d+)/\d+ \|")


def say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def prepare_data(cfg: RunConfig, corpus_bytes: int) -> None:
    """Corpus, tokenizer and shards at the paths the run config names (each skipped when present)."""
    if len(cfg.data.train_paths) != 1 or cfg.data.tokenizer is None:
        raise ValueError("the quickstart config must name one data.train_paths prefix and data.tokenizer")
    prefix = Path(cfg.data.train_paths[0])
    corpus = prefix.parent / "stdlib.jsonl"
    tokenizer = Path(cfg.data.tokenizer)
    if not corpus.is_file():
        docs = build_builtin_corpus(str(corpus), max_bytes=corpus_bytes)
        say(f"corpus: {docs} Python standard library files -> {corpus}")
    if not (tokenizer / "tokenizer.json").is_file():
        vocab = cfg.model_config().vocab_size
        train_tokenizer([str(corpus)], "bpe", vocab, str(tokenizer))
        say(f"tokenizer: byte-level BPE, {vocab} tokens -> {tokenizer}")
    if not Path(index_path(prefix)).is_file():
        stats = preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
        say(f"shards: {stats.tokens:,} tokens, {stats.documents} documents -> {prefix}")


def launch_command(config: Path, overrides: list[str], nproc: int, launcher: str) -> list[str]:
    script = str(Path(pretrain.__file__).resolve())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    if launcher == "deepspeed":
        runner = ["deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    else:
        runner = ["torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [sys.executable, "-m", *runner, "--master_port", port, script, "--config", str(config), *overrides]


def launch_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # One rank per share of the cores; more threads than cores makes every rank slower.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def training_ranks(launcher_pid: int) -> list[psutil.Process]:
    """The ranks under a launcher: the processes that run pretrain.py as their program (the launcher
    processes name it as an argument of `-m deepspeed.launcher...` / `-m torch.distributed.run`), less
    their data-loader workers, which are forks with the same command line."""
    script = str(Path(pretrain.__file__).resolve())

    def runs_script(process: psutil.Process) -> bool:
        cmdline = process.cmdline()
        return script in cmdline and "-m" not in cmdline[: cmdline.index(script)]

    ranks = []
    for process in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if runs_script(process) and not runs_script(process.parent()):
                ranks.append(process)
        except psutil.NoSuchProcess:
            continue
    return ranks


def train(command: list[str], env: dict[str, str], interrupt_at: int) -> int:
    """Run the training launcher, echoing its output; once step `interrupt_at` (0: never) has been
    logged, send SIGUSR1 to the ranks as a cluster's preemption notice would. Returns the exit status."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent = False
    for line in proc.stdout:
        print(line, end="", flush=True)
        match = _STEP_LINE.search(line)
        if interrupt_at and not sent and match and int(match.group(1)) >= interrupt_at:
            ranks = training_ranks(proc.pid)
            say(f"preempting the run: SIGUSR1 to its {len(ranks)} ranks (pids {[p.pid for p in ranks]})")
            for rank in ranks:
                rank.send_signal(signal.SIGUSR1)
            sent = True
    return proc.wait()


def report_loss_curve(csv_file: Path) -> None:
    """First and last training loss over both launches, from the CSV monitor (the summary's first
    loss is the resumed launch's)."""
    if not csv_file.is_file():
        return
    with open(csv_file) as f:
        rows = {int(step): float(loss) for step, loss in csv.reader(f) if step != "step"}
    first, last = min(rows), max(rows)
    curve = f"{rows[first]:.3f} at step {first}, {rows[last]:.3f} at {last}"
    say(f"train loss over both launches ({csv_file.name}): {curve}")


# Halting thresholds the evaluation sweeps beside the trained one: from no loss to about one pass per
# token on the quickstart model, so that its quality-against-compute plot is a curve, set against
# fixed pruning at the same mean passes.
EVAL_THRESHOLDS = "0.001,0.01,0.05,0.2"


def eval_arguments(export_dir: Path, cfg: RunConfig, output: Path) -> list[str]:
    return [
        str(export_dir),
        "--output", str(output),
        "--data", cfg.data.train_paths[0],
        "--split", cfg.data.split,
        "--split-name", "valid",
        "--seq-len", str(cfg.seq_len),
        "--max-windows", "64",
        "--sweep-threshold", EVAL_THRESHOLDS,
        "--policies", "uniform,geometric",
        "--no-progress",
    ]  # fmt: skip


def evaluate(export_dir: Path, cfg: RunConfig, output: Path) -> None:
    """`adaponder-eval` on the exported model: perplexity of the held-out validation documents (the
    training split's own) at the trained tau and a sweep of taus, against fixed pruning at the same
    mean passes, with passes and compute per token and NLL by passes run."""
    argv = eval_arguments(export_dir, cfg, output)
    say(f"evaluation: adaponder-eval {' '.join(argv)}")
    try:
        report = evaluation.run(evaluation.build_parser().parse_args(argv))
        print(evaluation.format_report(report), flush=True)
        for path in evaluation.write_report(report, output).values():
            say(f"wrote {path}" if isinstance(path, Path) else path)
    except ValueError as e:  # no validation documents; or no matplotlib for the plots (`eval` extra)
        say(f"evaluation: {e}")


def show_sample(export_dir: Path, new_tokens: int) -> None:
    model = generate.load_model(str(export_dir), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    torch.manual_seed(0)
    [(ids, passes)] = generate.generate(model, tokenizer, [PROMPT], new_tokens, sampling=None)
    mean = sum(passes) / max(len(passes), 1)
    say(f"sample (greedy; each token followed by [passes it took], of {model.config.num_passes}):")
    print((PROMPT + generate.render(tokenizer, ids, passes, colour=False)).replace("\n", "\\n"))
    say(f"{len(ids)} tokens, {mean:.2f} passes per token on average")


def where_everything_is(cfg: RunConfig, export_dir: Path) -> str:
    run = Path(cfg.run_dir).resolve()
    lines = [
        f"run directory     {run}",
        "  config.yaml     the resolved run config (also inside every checkpoint)",
        "  checkpoints/    ZeRO-3 shards per step; `latest` names the newest complete one",
        f"  tensorboard/    tensorboard --logdir {run / 'tensorboard'}   (tags: docs/metrics.md)",
        "  monitor/csv/    the same scalars as CSV (DeepSpeed's csv_monitor)",
        "  summary.json    the end-of-run summary printed above",
        "  data/           corpus, tokenizer and shards",
        "  eval/           adaponder-eval's eval.json and plots (perplexity against passes, NLL by passes)",
        f"exported model    {export_dir.resolve()}",
        f"  adaponder-generate --model {export_dir.resolve()} --prompt 'import os'",
        f"  AutoModelForCausalLM.from_pretrained('{export_dir.resolve()}', trust_remote_code=True)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaponder-quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="run config (repo-relative ok)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    parser.add_argument("--corpus-bytes", type=int, default=5_000_000, help="size of the built-in corpus")
    parser.add_argument(
        "--interrupt-at", type=int, help="preempt the first launch at this step (default: half-way; 0: never)"
    )
    parser.add_argument("--sample-tokens", type=int, default=24, help="tokens to generate at the end")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="run config overrides")
    args = parser.parse_args(argv)
    try:
        config = resolve_path(args.config, "--config")
        cfg = read_config(config, args.overrides)
        prepare_data(cfg, args.corpus_bytes)
    except ValueError as e:
        parser.error(str(e))
    interrupt_at = (cfg.train_steps or 0) // 2 if args.interrupt_at is None else args.interrupt_at
    command = launch_command(config, args.overrides, args.nproc, args.launcher)
    env = launch_env(args.nproc)
    summary_file = Path(cfg.run_dir) / "summary.json"
    say(f"training: {' '.join(command)}")
    status = train(command, env, interrupt_at)
    if status == 0 and json.loads(summary_file.read_text())["status"].startswith("stopped"):
        say("the run stopped with a checkpoint; the same command again resumes it")
        status = train(command, env, interrupt_at=0)
    if status != 0:
        say(f"training failed (exit status {status})")
        return status or 1
    report_loss_curve(Path(cfg.run_dir) / "monitor" / "csv" / "train_lm_loss.csv")

    export_dir = Path(cfg.run_dir) / "hf"
    info = export_checkpoint(cfg.run_dir, export_dir)
    say(f"exported step {info['step']} ({info['parameters']:,} parameters) -> {export_dir}")
    evaluate(export_dir, cfg, Path(cfg.run_dir) / "eval")
    show_sample(export_dir, args.sample_tokens)
    print("\n" + where_everything_is(cfg, export_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
