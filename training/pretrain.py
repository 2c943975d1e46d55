"""Pretraining entry point; every rank runs it.

    deepspeed --num_gpus 8 training/pretrain.py --config configs/pythia-70m.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 training/pretrain.py --config RUN.yaml
    python training/pretrain.py --config RUN.yaml            # one process
    adaponder-train --config RUN.yaml                        # the same, installed
    adaponder-train --config RUN.yaml --dry-run --world-size 8 --gpu-memory-gib 80   # the plan only
    adaponder-train --print-config [--config RUN.yaml] [key.sub=value ...]   # every key, explained

The config is loaded, validated and checked against the number of ranks, the tokenizer and the
DeepSpeed JSON before any process group starts. A run directory that holds a checkpoint resumes
from it. Exit status: 0 when training finished or stopped cleanly (exit_at_step, SIGTERM, SIGUSR1),
1 on a non-finite loss, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`deepspeed training/pretrain.py`): Python put training/ itself first on the path,
    # where our config.py, engine.py ... would shadow top-level modules; put the repository there.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from data.tokenizer import load_tokenizer  # noqa: E402
from model import AdaPonderConfig  # noqa: E402
from training import distributed as dist  # noqa: E402
from training import engine as ds  # noqa: E402
from training.config import (  # noqa: E402
    BatchPlan,
    RunConfig,
    describe_config,
    load_config,
    plan_batches,
    preset_of_checkpoint_name,
    read_config,
    resolve_path,
)
from training.memory import MemoryPlan, dense_forward_flops, host_allocator, plan_memory  # noqa: E402
from training.rank_status import RankStatus  # noqa: E402
from training.trainer import (  # noqa: E402
    DeferredSignals,
    NonFiniteLossError,
    Trainer,
    format_summary,
    lock_run_dir,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adaponder-train", description="Pretrain an AdaPonderLM model.")
    parser.add_argument("--config", help="run config YAML (defaults of training/config.py without)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the batch arithmetic and memory plan per rank, then exit",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults < --config < overrides), every key with its meaning "
        "and default as comments, then exit",
    )
    parser.add_argument(
        "--world-size", type=int, help="ranks to plan for with --dry-run (default: the launcher's, else 1)"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="device memory per rank for the largest micro-batch that fits "
        "(default: this machine's GPU; none on CPU)",
    )
    parser.add_argument(
        "--link-gbs",
        type=float,
        default=25.0,
        help="with --dry-run: collective bandwidth per rank in GB/s for the communication estimate "
        "(default 25: one 200 Gb/s InfiniBand port per GPU)",
    )
    parser.add_argument(
        "--sustained-tflops",
        type=float,
        default=400.0,
        help="with --dry-run: sustained TFLOP/s per rank for the compute estimate (default 400: 40%% "
        "of an H100's dense bf16 peak)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def preflight(cfg: RunConfig, world_size: int) -> tuple[BatchPlan, dict]:
    """Every check that needs no process group: batches, tokenizer vs vocabulary, DeepSpeed JSON."""
    plan = plan_batches(cfg, world_size)
    check_vocabulary(cfg, cfg.model_config())
    ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    return plan, ds_config


def memory_plan(cfg: RunConfig, plan: BatchPlan, ds_config: dict) -> tuple[MemoryPlan, int]:
    """The planner's figures per rank, and DeepSpeed's own model-states estimate beside them."""
    memory = plan_memory(cfg.model_config(), cfg, plan.data_parallel_size, ds_config)
    sizes = memory.sizes
    estimate = ds.zero3_model_states_estimate(
        sizes.total, max(sizes.layer, sizes.table), plan.data_parallel_size
    )
    return memory, estimate


def describe_plan(cfg: RunConfig, plan: BatchPlan, ds_config: dict, gpu_memory_gib: float | None) -> str:
    memory, estimate = memory_plan(cfg, plan, ds_config)
    if gpu_memory_gib is None and ds.accelerator_memory_bytes():
        gpu_memory_gib = ds.accelerator_memory_bytes() / 2**30
    return f"batch: {plan.describe()}\n" + memory.describe(gpu_memory_gib, estimate)


def dry_run(args: argparse.Namespace) -> int:
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = plannable(read_config(args.config, args.overrides))
        cfg.validate(check_data=False)  # plans on a machine without the data; the run checks it
        plan = plan_batches(cfg, world_size)
        ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    except ValueError as e:
        print(f"adaponder-train: configuration error: {e}", file=sys.stderr)
        return 2
    print(describe_plan(cfg, plan, ds_config, args.gpu_memory_gib))
    memory = plan_memory(cfg.model_config(), cfg, plan.data_parallel_size, ds_config)
    flops = dense_forward_flops(cfg.model_config(), cfg.seq_len)
    print(
        memory.describe_communication(
            plan.gradient_accumulation_steps, flops, args.link_gbs, args.sustained_tflops
        )
    )
    return 0


def plannable(cfg: RunConfig) -> RunConfig:
    """The config to plan with: when model.init_from is not on this machine, the preset of the shape
    its directory name gives (memory and batches depend on the shape only), said so on stderr."""
    init_from = cfg.model.init_from
    if init_from is None or (Path(init_from) / "config.json").is_file():
        return cfg
    preset = preset_of_checkpoint_name(init_from)
    if preset is None:
        raise ValueError(
            f"model.init_from: {init_from} has no config.json, and its name names no Pythia size to plan "
            "with: put the weights there, or plan with model.init_from=null model.preset=pythia-SIZE"
        )
    print(
        f"adaponder-train: model.init_from {init_from} is not on this machine: planning with the shape of "
        f"preset {preset} (from the directory's name); the run itself needs the weights there",
        file=sys.stderr,
    )
    model = dataclasses.replace(cfg.model, preset=preset, init_from=None)
    return dataclasses.replace(cfg, model=model)


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


def print_config(args: argparse.Namespace) -> int:
    try:
        cfg = read_config(args.config, args.overrides)  # not validated: files may live elsewhere
    except ValueError as e:
        print(f"adaponder-train: configuration error: {e}", file=sys.stderr)
        return 2
    sources = " < ".join([args.config] * bool(args.config) + ["overrides"] * bool(args.overrides))
    print(describe_config(cfg, sources or "nothing else"), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    if args.dry_run:
        return dry_run(args)
    signals = DeferredSignals()  # a preemption notice from here on stops at the first step boundary
    try:
        return _train(args, signals)
    finally:
        signals.restore()


def _train(args: argparse.Namespace, signals: DeferredSignals) -> int:
    world_size = dist.setup_environment()
    # A CPU-only run's memory plan counts live tensors; glibc must give freed ones back (memory.py).
    allocator = host_allocator() if not torch.cuda.is_available() else None
    try:
        cfg = load_config(args.config, args.overrides)
        plan, ds_config = preflight(cfg, world_size)
    except ValueError as e:
        print(f"adaponder-train: configuration error: {e}", file=sys.stderr)
        return 2
    ds.init_distributed()
    try:
        # Before anything is written into the run directory (rank status files included): a second
        # launch must not touch a live run's files.
        lock = lock_run_dir(Path(cfg.run_dir))  # noqa: F841 (held for the life of the process)
    except ValueError as e:
        print(f"adaponder-train: {e}", file=sys.stderr, flush=True)
        dist.shutdown()
        return 2
    if dist.is_main_process():
        print(describe_plan(cfg, plan, ds_config, args.gpu_memory_gib), flush=True)
        if allocator:
            print(f"host allocator: {allocator}", flush=True)
    status = RankStatus(
        Path(cfg.run_dir),
        dist.rank(),
        world_size,
        run_id=dist.broadcast_object(f"{os.getpid()}@{time.time()}"),
    )
    try:
        trainer = Trainer(cfg, plan, ds_config, status, signals)
        dist.print0(format_summary(trainer.train()))
    except ValueError as e:  # a resume that does not fit, missing validation data, ...
        status.finish(e)
        print(f"adaponder-train: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        status.finish(e)
        print(f"adaponder-train: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # out of memory, a collective that failed because another rank died, ...
        status.finish(e)
        traceback.print_exc()
        status.report(
            f"adaponder-train: rank {dist.rank()} failed: {status.describe_self()}\n"
            + status.failure_report()
        )
        return 1
    else:
        status.finish()
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
