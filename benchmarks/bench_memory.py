"""Measured peak memory per rank beside the planner's estimate (training/memory.py), per preset.

    python benchmarks/bench_memory.py [--presets pythia-70m pythia-160m pythia-410m] [--ranks 2]
        [--seq-len 128 --micro-batch 1 --passes 4 --steps 2] [--no-checkpointing] [--ds-config FILE]
    python benchmarks/bench_memory.py --plan-table [--gpu-memory-gib 80 --ranks 8]   # no training

Each preset is a real training run (training/pretrain.py under torchrun, DeepSpeed ZeRO-3, fp32,
the run config's "auto" buckets) on a small slice of text; its ranks record resident memory per
phase (training/rank_status.py: init, forward, backward, step of the first steps; peak within the
phase from the kernel's high-water mark; the run itself tells glibc to return freed blocks of
64 KiB and more, so that resident memory follows live tensors: training.memory.host_allocator; the
benchmark adds nothing to the environment of the command users run). The baseline
is the rank's resident size before the model is built (Python, torch, DeepSpeed, the process
group); the planner estimates what comes on top of it, so the table compares the planner with
(peak - baseline). The presets run one after another; each holds the model on every rank.

`--plan-table` prints, without training, what fits per rank for every Pythia preset on
`--ranks` x `--gpu-memory-gib` (bf16, 2048 tokens, K=4, ZeRO-3 with derived buckets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("init", "forward@1", "backward@1", "step@1", "forward@2", "backward@2", "step@2")


def build_data(work: Path) -> tuple[str, str]:
    """~1 MB of the Python standard library's sources, a 512-token BPE tokenizer, and its shards."""
    from data.builtin_corpus import build_builtin_corpus
    from data.preprocess import preprocess
    from data.train_tokenizer import train_tokenizer

    prefix = work / "data" / "stdlib_text_document"
    tokenizer = work / "data" / "tokenizer"
    if not Path(f"{prefix}.idx").exists():
        (work / "data").mkdir(parents=True, exist_ok=True)
        corpus = work / "data" / "stdlib.jsonl"
        build_builtin_corpus(str(corpus), max_bytes=1_000_000)
        train_tokenizer([str(corpus)], "bpe", 512, str(tokenizer))
        preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
    return str(prefix), str(tokenizer)


def overrides(args: argparse.Namespace, preset: str, run_dir: Path, data: tuple[str, str]) -> list[str]:
    prefix, tokenizer = data
    return [
        f"run_dir={run_dir}",
        f"model.preset={preset}",
        f"model.overrides.num_passes={args.passes}",
        f"data.train_paths=[{prefix}]",
        f"data.tokenizer={tokenizer}",
        "data.num_workers=0",
        f"seq_len={args.seq_len}",
        f"micro_batch_size={args.micro_batch}",
        f"global_batch_size={args.micro_batch * args.ranks}",
        f"train_steps={args.steps}",
        "precision=fp32",
        f"activation_checkpointing={str(not args.no_checkpointing).lower()}",
        f"deepspeed_config={args.ds_config}",
        "logging.eval_interval=0",
        "logging.log_interval=1",
        "logging.progress_bar=false",
        "checkpoint.interval=0",
    ]


def run_preset(args: argparse.Namespace, preset: str, data: tuple[str, str]) -> dict:
    from training.distributed import free_port

    run_dir = Path(args.work) / f"run-{preset}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.ranks),
        "--master_port",
        str(free_port()),
        str(REPO / "training" / "pretrain.py"),
        *overrides(args, preset, run_dir, data),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    written = disk_written_bytes(Path(args.work))
    log = Path(args.work) / f"{preset}.log"
    with log.open("w") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    written = disk_written_bytes(Path(args.work)) - written
    statuses = {
        int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")
    }
    swap = [p for p in (run_dir / "nvme-offload").rglob("*") if p.is_file()]
    swap_bytes = sum(p.stat().st_size for p in swap)
    if not args.keep_runs:  # numbers only: no checkpoints, no swap files
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "nvme-offload", ignore_errors=True)
    return {
        "returncode": result.returncode,
        "seconds": time.perf_counter() - started,
        "disk_written": written,
        "swap_files": len(swap),
        "swap_bytes": swap_bytes,
        "ranks": statuses,
        "log": log,
    }


def disk_written_bytes(path: Path) -> int:
    """Bytes written so far to the block device that holds `path` (/proc/diskstats; every process's
    writes, so the figure of a run is an upper bound on what the run wrote)."""
    device = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve().name
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == name:
            return int(fields[9]) * 512  # sectors written
    return 0


def planned(args: argparse.Namespace, preset: str, data: tuple[str, str]) -> dict[str, float]:
    from training import engine as ds
    from training.config import plan_batches, read_config, resolve_path
    from training.memory import GIB, plan_memory

    cfg = read_config(None, overrides(args, preset, Path(args.work) / "plan", data))
    plan = plan_batches(cfg, args.ranks)
    ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    memory = plan_memory(cfg.model_config(), cfg, args.ranks, ds_config)
    # On CPU the device and the host are the same memory.
    figures = {phase: b / GIB for phase, b in memory.phase_peaks(host=True).items()}
    figures["peak"] = memory.peak(host=True) / GIB
    # Adam's moments are created by the first optimizer step: the first backward runs without them.
    figures["backward@1"] = figures["backward"] - memory.states.get("Adam moments", 0) / GIB
    figures["parameters"] = memory.sizes.total
    figures["items"] = plan_items(memory)
    return figures


def plan_items(memory) -> str:
    """The planned backward peak, item by item (GiB): what the measured phases are compared with."""
    from training.memory import GIB

    states = {**memory.states, **memory.host_states}
    kept, transient = memory.activations()
    shared = memory.shared_gradients * memory.dtype_bytes
    items = {
        "weights+grads+master": sum(v for k, v in states.items() if k != "Adam moments"),
        "Adam": states.get("Adam moments", 0),
        "layer grads (K passes)": shared,
        "tables+mixture": memory.gathered("backward") - shared,
        "kept activations": kept,
        "backward transient": transient + memory.buckets,
    }
    return ", ".join(f"{name} {value / GIB:.2f}" for name, value in items.items())


def measured(record: dict) -> dict[str, float]:
    """Peak within each phase minus the rank's baseline, the first step's and the second's."""
    base = record["baseline_rss_gib"]
    breakdown = record["breakdown"]
    figures = {"baseline": base, "run_peak_raw": record["run_peak_rss_gib"]}
    for key, values in breakdown.items():
        figures[key] = values["peak_rss_gib"] - base
        figures[f"{key} end"] = values["rss_gib"] - base
    figures["peak"] = record["run_peak_rss_gib"] - base
    return figures


def bench(args: argparse.Namespace) -> None:
    from training.memory import GIB

    Path(args.work).mkdir(parents=True, exist_ok=True)
    data = build_data(Path(args.work))
    ckpt = "off" if args.no_checkpointing else "on"
    print(
        f"fp32, {args.ranks} ranks, micro-batch {args.micro_batch} x {args.seq_len} tokens, K={args.passes}, "
        f"activation checkpointing {ckpt}, {args.ds_config}; GiB per rank above the baseline (the rank's "
        "resident size before the model is built); phase figures are the peak within the phase, 'at the end' "
        "rows the resident size when the phase ended"
    )
    header = (
        f"{'preset':<12} {'rank':>4} {'base':>5} | {'init':>5} {'fwd1':>5} {'bwd1':>5} {'step1':>5} "
        f"{'fwd2':>5} {'bwd2':>5} {'step2':>5} | {'peak':>5} {'plan':>5} {'plan/meas':>9} "
        "| plan: fwd bwd1 bwd step"
    )
    print(header)
    for preset in args.presets:
        plan = planned(args, preset, data)
        result = run_preset(args, preset, data)
        if result["returncode"] != 0 or not result["ranks"]:
            print(f"{preset:<12} run failed (exit {result['returncode']}); log: {result['log']}")
            continue
        for rank, record in sorted(result["ranks"].items()):
            m = measured(record)
            cells = " ".join(f"{m.get(k, float('nan')):5.2f}" for k in PHASES)
            phases = " ".join(f"{plan[k]:.2f}" for k in ("forward", "backward@1", "backward", "step"))
            print(
                f"{preset:<12} {rank:>4} {m['baseline']:5.2f} | {cells} | {m['peak']:5.2f} "
                f"{plan['peak']:5.2f} {plan['peak'] / m['peak']:9.2f} | {phases}"
            )
            ends = " ".join(f"{m.get(f'{k} end', float('nan')):5.2f}" for k in PHASES)
            print(f"{'  at the end':<12} {rank:>4} {'':>5} | {ends} |")
        print(f"{'':<12} ({plan['parameters']:,} parameters; {result['seconds']:.0f} s; log {result['log']})")
        print(f"{'':<12} planned backward peak: {plan['items']}")
        if result["swap_files"]:
            print(
                f"{'':<12} NVMe swap folder: {result['swap_bytes'] / GIB:.2f} GiB in {result['swap_files']} "
                f"files; the disk took {result['disk_written'] / GIB:.2f} GiB of writes during the run"
            )


def plan_table(args: argparse.Namespace) -> None:
    """What fits per rank on `--ranks` GPUs of `--gpu-memory-gib`, bf16, 2048 tokens, K=4."""
    from model import PRESETS, AdaPonderConfig
    from training.config import plan_batches, read_config
    from training.engine import load_ds_config
    from training.memory import GIB, plan_memory

    print(
        f"ZeRO-3 ({args.ds_config}, derived buckets), bf16, {args.ranks} ranks x "
        f"{args.gpu_memory_gib:g} GiB, seq 2048, K=4; planned GiB per rank"
    )
    print(
        f"{'preset':<12} {'params':>14} {'states':>7} {'gathered':>8} | {'act/sample ckpt':>15} "
        f"{'max mb ckpt':>11} | {'act/sample no-ckpt':>18} {'max mb no-ckpt':>14}"
    )
    for preset in (p for p in PRESETS if p.startswith("pythia")):
        cfg = read_config(
            None,
            [
                f"model.preset={preset}",
                "seq_len=2048",
                "micro_batch_size=1",
                f"global_batch_size={args.ranks}",
                "train_steps=1",
                "precision=bf16",
                "activation_checkpointing=true",
                f"deepspeed_config={args.ds_config}",
            ],
        )
        plan = plan_batches(cfg, args.ranks)
        ds_config = load_ds_config(REPO / args.ds_config, cfg, plan)
        memory = plan_memory(AdaPonderConfig.from_preset(preset), cfg, args.ranks, ds_config)
        budget = int(args.gpu_memory_gib * GIB)
        cells = []
        for flag in (True, False):
            per_sample = memory.activation_per_sample(flag) / GIB
            cells.append((per_sample, memory.max_micro_batch(budget, flag)))
        (ckpt_act, ckpt_mb), (full_act, full_mb) = cells
        print(
            f"{preset:<12} {memory.sizes.total:>14,} {sum(memory.states.values()) / GIB:7.2f} "
            f"{memory.gathered('backward') / GIB:8.2f} | {ckpt_act:15.2f} {ckpt_mb:>11} | "
            f"{full_act:18.2f} {full_mb:>14}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["pythia-70m", "pythia-160m", "pythia-410m"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--ds-config", default="ds_configs/zero3.json")
    parser.add_argument("--work", default="/tmp/bench-memory")
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' checkpoints")
    parser.add_argument("--plan-table", action="store_true")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.plan_table:
        plan_table(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
