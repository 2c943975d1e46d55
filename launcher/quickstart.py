"""`adaponder-quickstart`: a short real training that needs no download and no GPU.

1. a corpus of real text every machine has: the Python standard library's sources (data.builtin_corpus);
2. a byte-level BPE tokenizer trained on it, with the model's vocabulary size;
3. MMIDIDX shards of the tokenized corpus;
4. ZeRO-3 training on 2 ranks (CPU unless a GPU is present) through the `deepspeed` launcher, with
   TensorBoard logs and checkpoints under the run directory (configs/quickstart.yaml);
5. a summary: loss at the start and end, mean passes per token, where the outputs are.

Steps whose outputs exist are skipped, and the training resumes from its own checkpoint, so running it
again continues (or just reports) the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from data.builtin_corpus import build_builtin_corpus
from data.indexed import index_path
from data.preprocess import preprocess
from data.train_tokenizer import train_tokenizer
from training import pretrain
from training.config import RunConfig, read_config, resolve_path
from training.trainer import format_summary


def prepare_data(cfg: RunConfig, corpus_bytes: int) -> None:
    """Corpus, tokenizer and shards at the paths the run config names (each skipped when present)."""
    if len(cfg.data.train_paths) != 1 or cfg.data.tokenizer is None:
        raise ValueError("the quickstart config must name one data.train_paths prefix and data.tokenizer")
    prefix = Path(cfg.data.train_paths[0])
    corpus = prefix.parent / "stdlib.jsonl"
    tokenizer = Path(cfg.data.tokenizer)
    if not corpus.is_file():
        docs = build_builtin_corpus(str(corpus), max_bytes=corpus_bytes)
        print(f"[quickstart] corpus: {docs} Python standard library files -> {corpus}", flush=True)
    if not (tokenizer / "tokenizer.json").is_file():
        vocab = cfg.model_config().vocab_size
        train_tokenizer([str(corpus)], "bpe", vocab, str(tokenizer))
        print(f"[quickstart] tokenizer: byte-level BPE, {vocab} tokens -> {tokenizer}", flush=True)
    if not Path(index_path(prefix)).is_file():
        stats = preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
        print(
            f"[quickstart] shards: {stats.tokens:,} tokens, {stats.documents} documents -> {prefix}",
            flush=True,
        )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaponder-quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="run config (repo-relative ok)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    parser.add_argument("--corpus-bytes", type=int, default=5_000_000, help="size of the built-in corpus")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="run config overrides")
    args = parser.parse_args(argv)
    try:
        config = resolve_path(args.config, "--config")
        cfg = read_config(config, args.overrides)
        prepare_data(cfg, args.corpus_bytes)
    except ValueError as e:
        parser.error(str(e))
    command = launch_command(config, args.overrides, args.nproc, args.launcher)
    print(f"[quickstart] training: {' '.join(command)}", flush=True)
    result = subprocess.run(command, env=launch_env(args.nproc))
    summary_file = Path(cfg.run_dir) / "summary.json"
    if result.returncode != 0 or not summary_file.is_file():
        print(f"[quickstart] training failed (exit status {result.returncode})", file=sys.stderr)
        return result.returncode or 1
    print("\n" + format_summary(json.loads(summary_file.read_text())))
    print(f"outputs: {Path(cfg.run_dir).resolve()} (config.yaml, checkpoints/, tensorboard/, summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
