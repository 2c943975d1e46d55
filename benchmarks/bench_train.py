"""Training throughput and memory under DeepSpeed ZeRO-3 (ds_configs/zero3.json), pythia-70m shape.

    python benchmarks/bench_train.py [--seq-len 64 --micro-batch 2 --steps 3]
    python benchmarks/bench_train.py --without-deepspeed [--steps 5]

`--without-deepspeed`: ours with K=1 against transformers.GPTNeoXForCausalLM, forward + backward in
one process, steps interleaved, timed by the wall clock and by process CPU time (median).

Cases, each a fresh torchrun job with the same DeepSpeed config, optimizer and batch per rank:
  ours K=4 adaptive on 2 ranks and on 1 rank (ZeRO-3 scaling, memory per rank);
  transformers.GPTNeoXForCausalLM and ours with K=1 on 2 ranks (the same FLOPs: implementation
  overhead), against which ours K=4 is compared as K x the time of a GPT-NeoX step.
Pondering does more than K backbone passes: between passes it runs the head and the mixture
P @ E (4 D V FLOPs per token, large next to a 70M backbone), so the table also gives the ratio
normalised by the model's own FLOP count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "ours-k4-2ranks": ("ours", 4, 2),
    "ours-k4-1rank": ("ours", 4, 1),
    "ours-k1-2ranks": ("ours", 1, 2),
    "hf-gptneox-2ranks": ("hf", 1, 2),
}


def build(kind: str, passes: int):
    """(model, its config): ours with K passes, or GPTNeoXForCausalLM, pythia-70m shape."""
    from transformers import GPTNeoXForCausalLM

    from model import AdaPonderConfig, AdaPonderForCausalLM
    from model.hf_compat import gpt_neox_config

    config = AdaPonderConfig.from_preset("pythia-70m", num_passes=passes, adaptive=passes > 1)
    if kind == "ours":
        return lambda: AdaPonderForCausalLM(config), config
    hf_config = gpt_neox_config(config, attention_dropout=0.0, hidden_dropout=0.0)
    return lambda: GPTNeoXForCausalLM(hf_config), config


def step_inputs(kind: str, tokens) -> dict:
    """The trainer's call for ours; the Hugging Face convention (labels shifted inside) for GPT-NeoX."""
    if kind == "hf":
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, :-1]}
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "shift_labels": False,
        "ponder_lambda": 0.1,
        "ponder_k": 0.1,
    }


def without_deepspeed(args: argparse.Namespace) -> None:
    import statistics

    import torch

    torch.manual_seed(0)
    models = {kind: build(kind, 1)[0]().train() for kind in ("ours", "hf")}
    vocab = build("ours", 1)[1].vocab_size
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1))
    times = {kind: [] for kind in models}

    def step(kind: str) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        models[kind](**step_inputs(kind, tokens)).loss.backward()
        models[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(args.warmup):
        for kind in models:
            step(kind)
    for _ in range(args.steps):
        for kind in models:
            times[kind].append(step(kind))
    print(
        f"pythia-70m shape, fp32, no DeepSpeed, {torch.get_num_threads()} thread(s), batch "
        f"{args.micro_batch} x seq {args.seq_len}, forward + backward, median of {args.steps}\n"
    )
    print("| clock | ours K=1 s | GPT-NeoX s | ours / GPT-NeoX |")
    print("|---|---|---|---|")
    for clock, name in ((0, "wall"), (1, "cpu")):
        ours = statistics.median(t[clock] for t in times["ours"])
        hf = statistics.median(t[clock] for t in times["hf"])
        print(f"| {name} | {ours:.3f} | {hf:.3f} | {ours / hf:.3f} |")


def worker(args: argparse.Namespace) -> None:
    """One rank of one case: build under zero.Init, warm up, time `--steps` optimizer steps."""
    import resource

    import torch

    from model.accounting import forward_flops
    from training import distributed as dist
    from training import engine as ds
    from training.config import plan_batches, read_config

    kind, passes, _ = CASES[args.worker]
    world = dist.setup_environment()
    cfg = read_config(
        None,
        [
            "model.preset=pythia-70m",
            f"seq_len={args.seq_len}",
            f"micro_batch_size={args.micro_batch}",
            f"global_batch_size={args.micro_batch * world}",
            "train_steps=1",
            "precision=fp32",
        ],
    )
    plan = plan_batches(cfg, world)
    ds_config = ds.load_ds_config(REPO / cfg.deepspeed_config, cfg, plan)
    ds.init_distributed()
    factory, config = build(kind, passes)
    model = ds.build_model(factory, ds_config)
    engine = ds.Engine(model, [{"params": list(model.parameters())}], ds_config)
    engine.train()
    generator = torch.Generator().manual_seed(dist.rank())
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)

    def step() -> None:
        out = engine(**step_inputs(kind, tokens))
        engine.backward(out.loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - started) / args.steps
    cpu_seconds = dist.all_gather_object((time.process_time() - cpu_started) / args.steps)
    real = torch.ones(args.micro_batch, args.seq_len, dtype=torch.bool)
    active = torch.ones(passes, args.micro_batch, args.seq_len, dtype=torch.bool)
    flops = float(forward_flops(config, active, real)["dense_total"])  # K=1: GPT-NeoX's own forward
    result = {
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,  # per rank: less disturbed by other jobs than the wall clock
        "tokens_per_sec": plan.tokens_per_step / seconds,
        "forward_flops_per_rank": flops,
        "peak_rss_gib": dist.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        "params_per_rank": dist.all_gather_object(ds.local_parameter_count(engine.module)),
    }
    if dist.is_main_process():
        Path(args.out).write_text(json.dumps(result))
    dist.shutdown()


def run_case(name: str, args: argparse.Namespace, out: Path) -> dict:
    nproc = CASES[name][2]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port"),
        str(29700 + list(CASES).index(name)),
        __file__,
        *("--worker", name, "--out", str(out), "--seq-len", str(args.seq_len)),
        *("--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)),
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(REPO)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def table(results: dict[str, dict], passes: int) -> str:
    rows = ["| case | tokens/s (all ranks) | step s | peak RSS GiB per rank | parameters held per rank |"]
    rows.append("|---|---|---|---|---|")
    for name, r in results.items():
        rss = ", ".join(f"{m:.2f}" for m in r["peak_rss_gib"])
        params = ", ".join(f"{p / 1e6:.1f}M" for p in r["params_per_rank"])
        rows.append(f"| {name} | {r['tokens_per_sec']:,.0f} | {r['step_seconds']:.2f} | {rss} | {params} |")
    two, one = results["ours-k4-2ranks"], results["ours-k4-1rank"]
    hf, k1 = results["hf-gptneox-2ranks"], results["ours-k1-2ranks"]
    raw = two["step_seconds"] / (passes * hf["step_seconds"])
    flop_ratio = two["forward_flops_per_rank"] / (passes * hf["forward_flops_per_rank"])
    rows += [
        "",
        f"- ZeRO-3, 2 ranks vs 1 rank: tokens/s x{two['tokens_per_sec'] / one['tokens_per_sec']:.2f}; "
        f"parameters held per rank x{two['params_per_rank'][0] / one['params_per_rank'][0]:.2f}; "
        f"peak RSS per rank x{max(two['peak_rss_gib']) / max(one['peak_rss_gib']):.2f}",
        f"- ours K=1 vs GPT-NeoX step (same FLOPs): x{k1['step_seconds'] / hf['step_seconds']:.2f} wall, "
        f"x{sum(k1['step_cpu_seconds']) / sum(hf['step_cpu_seconds']):.2f} CPU time (both ranks)",
        f"- ours K={passes} step vs {passes} x GPT-NeoX step: x{raw:.2f} raw; the K={passes} step has "
        f"x{flop_ratio:.2f} the FLOPs of {passes} GPT-NeoX steps (head + mixture between passes), "
        f"so x{raw / flop_ratio:.2f} per FLOP",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run")
    parser.add_argument("--without-deepspeed", action="store_true", help="ours K=1 vs GPT-NeoX, one process")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.without_deepspeed:
        without_deepspeed(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_case(name, args, Path(tmp) / f"{name}.json")
    if results.keys() != CASES.keys():
        print(json.dumps(results, indent=1))
        return
    print(f"pythia-70m shape, fp32, ZeRO-3, seq_len {args.seq_len}, micro batch {args.micro_batch}/rank\n")
    print(table(results, CASES["ours-k4-2ranks"][1]))


if __name__ == "__main__":
    main()
