"""Pretraining entry point; every rank runs it.

    deepspeed --num_gpus 8 training/pretrain.py --config configs/pythia-70m.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 training/pretrain.py --config RUN.yaml
    python training/pretrain.py --config RUN.yaml            # one process
    adaponder-train --config RUN.yaml                        # the same, installed

The config is loaded, validated and checked against the number of ranks, the tokenizer and the
DeepSpeed JSON before any process group starts. A run directory that holds a checkpoint resumes
from it. Exit status: 0 when training finished or stopped cleanly (exit_at_step, SIGTERM, SIGUSR1),
1 on a non-finite loss, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`deepspeed training/pretrain.py`): Python put training/ itself first on the path,
    # where our config.py, engine.py ... would shadow top-level modules; put the repository there.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from data.tokenizer import load_tokenizer  # noqa: E402
from model import AdaPonderConfig  # noqa: E402
from training import distributed as dist  # noqa: E402
from training import engine as ds  # noqa: E402
from training.config import BatchPlan, RunConfig, load_config, plan_batches, resolve_path  # noqa: E402
from training.trainer import NonFiniteLossError, Trainer, format_summary  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adaponder-train", description="Pretrain an AdaPonderLM model.")
    parser.add_argument("--config", help="run config YAML (defaults of training/config.py without)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def preflight(cfg: RunConfig, world_size: int) -> tuple[BatchPlan, dict]:
    """Every check that needs no process group: batches, tokenizer vs vocabulary, DeepSpeed JSON."""
    plan = plan_batches(cfg, world_size)
    check_vocabulary(cfg, cfg.model_config())
    ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    return plan, ds_config


def check_vocabulary(cfg: RunConfig, model_config: AdaPonderConfig) -> None:
    if cfg.data.tokenizer is None:
        return
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}: token ids would fall outside the embedding "
            "(set model.overrides.vocab_size, or use the tokenizer the model was trained with)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = dist.setup_environment()
    try:
        cfg = load_config(args.config, args.overrides)
        plan, ds_config = preflight(cfg, world_size)
    except ValueError as e:
        print(f"adaponder-train: configuration error: {e}", file=sys.stderr)
        return 2
    ds.init_distributed()
    try:
        trainer = Trainer(cfg, plan, ds_config)
    except ValueError as e:  # a resume that does not fit, missing validation data, ...
        print(f"adaponder-train: {e}", file=sys.stderr, flush=True)
        dist.shutdown()
        return 2
    try:
        dist.print0(format_summary(trainer.train()))
    except NonFiniteLossError as e:
        print(f"adaponder-train: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
