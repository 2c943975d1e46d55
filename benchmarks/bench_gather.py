"""Bytes through torch.distributed per ZeRO-3 training step: does a K-pass model gather K times?

    python benchmarks/bench_gather.py [--preset pythia-70m --seq-len 32 --micro-batch 1]

Cases, one after the other in one 2-rank torchrun job, each a fresh engine with
ds_configs/zero3.json filled by the planner (training.memory.zero_buckets), fp32, the same batch:
  k1                    the model with K=1 (a plain model's step: every weight gathered once in
                        forward, once in backward)
  k4                    K=4 as planned: the reuse distance and live-parameter limit cover one
                        pass's parameters, so a layer gathered in pass 1 stays for passes 2-4
  k4-reuse-one-layer    K=4 with the reuse distance one layer and live parameters two vocabulary
                        tables (what the planner used to set): every pass gathers every layer again
Every rank wraps torch.distributed's collectives before DeepSpeed binds them and counts the bytes of
their tensors over the step after two warm-up steps (ZeRO-3 prefetches from the trace it records
in the first steps): all-gathers by their output (the full tensors), reduce-scatters by their input
(the full gradients), all-reduces and broadcasts by their tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "k1": (1, False),
    "k4": (4, False),
    "k4-reuse-one-layer": (4, True),
}
# name -> which argument holds the tensor(s) whose size is counted
COUNTED = {
    "all_gather_into_tensor": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "all_gather": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter": ("reduce_scatter", 1),
    "all_reduce": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
}


def _nbytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def count_collectives() -> Counter:
    """Wrap torch.distributed's collectives (both the package's and distributed_c10d's names, before
    DeepSpeed binds them); the returned Counter sums bytes by kind while `counting` is set."""
    import torch.distributed as torch_dist
    from torch.distributed import distributed_c10d

    counts: Counter = Counter()
    counts["counting"] = 0

    def wrap(original, kind, position):
        def collective(*args, **kwargs):
            if counts["counting"]:
                value = args[position] if len(args) > position else next(iter(kwargs.values()), None)
                counts[kind] += _nbytes(value)
            return original(*args, **kwargs)

        return collective

    for module in (torch_dist, distributed_c10d):
        for name, (kind, position) in COUNTED.items():
            if hasattr(module, name):
                setattr(module, name, wrap(getattr(module, name), kind, position))
    return counts


def previous_sizes(config) -> dict[str, int]:
    """ZeRO-3 limits that release a layer after each use: re-gathered in every pass."""
    from training.memory import model_sizes

    sizes = model_sizes(config)
    return {
        "stage3_max_reuse_distance": sizes.layer,
        "stage3_max_live_parameters": max(2 * sizes.table, 2 * sizes.layer),
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: every case in turn in this process group, a fresh engine each."""
    counts = count_collectives()
    from training import distributed as dist
    from training import engine as ds

    dist.setup_environment()
    ds.init_distributed()
    results = {name: measure_case(name, args, counts) for name in args.worker.split(",")}
    if dist.is_main_process():
        Path(args.out).write_text(json.dumps(results))
    dist.shutdown()


def measure_case(name: str, args: argparse.Namespace, counts: Counter) -> dict:
    import torch

    from model import AdaPonderForCausalLM
    from training import distributed as dist
    from training import engine as ds
    from training.config import plan_batches, read_config
    from training.optim import param_groups

    passes, regather = CASES[name]
    world = dist.world_size()
    cfg = read_config(
        None,
        [
            f"model.preset={args.preset}",
            f"model.overrides.num_passes={passes}",
            f"model.overrides.adaptive={passes > 1}",
            f"seq_len={args.seq_len}",
            f"micro_batch_size={args.micro_batch}",
            f"global_batch_size={args.micro_batch * world}",
            "train_steps=1",
            "precision=fp32",
        ],
    )
    plan = plan_batches(cfg, world)
    ds_config = ds.load_ds_config(REPO / cfg.deepspeed_config, cfg, plan)
    config = cfg.model_config()
    if regather:
        ds_config["zero_optimization"].update(previous_sizes(config))
    torch.manual_seed(0)
    model = ds.build_model(lambda: AdaPonderForCausalLM(config), ds_config)
    engine = ds.Engine(model, param_groups(model, cfg.optimizer), ds_config)
    engine.train()
    generator = torch.Generator().manual_seed(dist.rank())
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)

    def step() -> None:
        out = engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(out.loss)
        engine.step()

    for _ in range(2):
        step()
    dist.barrier()
    counts.clear()
    counts["counting"] = 1
    step()
    counts["counting"] = 0
    mine = {k: v for k, v in counts.items() if k != "counting"}
    parameter_bytes = sum(ds.full_shape(p).numel() * 4 for p in engine.parameters())
    return {"per_rank": dist.all_gather_object(mine), "parameter_bytes": parameter_bytes}


def measure(args: argparse.Namespace, cases: list[str]) -> dict[str, dict]:
    """Every case in one 2-rank torchrun job; {case: {"per_rank": [{kind: bytes}], ...}}."""
    from training.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "gather.json")
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("--master_port", str(free_port()), __file__, "--worker", ",".join(cases), "--out", str(out)),
            *(
                "--preset",
                args.preset,
                "--seq-len",
                str(args.seq_len),
                "--micro-batch",
                str(args.micro_batch),
            ),
        ]
        env = {
            **os.environ,
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "PYTHONPATH": str(REPO),
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench_gather failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(results: dict[str, dict]) -> str:
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
    rows = ["| case | " + " | ".join(f"{k} MB" for k in kinds) + " | all-gather / K=1 |", "|---" * 6 + "|"]
    base = results["k1"]["per_rank"][0].get("all_gather", 0) if "k1" in results else None
    for name, r in results.items():
        rank0 = r["per_rank"][0]
        cells = " | ".join(f"{rank0.get(k, 0) / 1e6:.1f}" for k in kinds)
        ratio = f"x{rank0.get('all_gather', 0) / base:.2f}" if base else "-"
        rows.append(f"| {name} | {cells} | {ratio} |")
    sizes = ", ".join(f"{name} {r['parameter_bytes'] / 1e6:.1f} MB" for name, r in results.items())
    rows += ["", f"bytes per step on rank 0 (the ranks agree); parameters in fp32: {sizes}"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="pythia-70m")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(table(measure(args, args.cases)))


if __name__ == "__main__":
    main()
