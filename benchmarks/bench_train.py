"""Training throughput and memory under DeepSpeed ZeRO-3 (ds_configs/zero3.json), pythia-70m shape.

    python benchmarks/bench_train.py [--seq-len 64 --micro-batch 2 --steps 3]

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


def worker(args: argparse.Namespace) -> None:
    """One rank of one case: build under zero.Init, warm up, time `--steps` optimizer steps."""
    import resource

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from model import AdaPonderConfig, AdaPonderForCausalLM
    from model.modeling import forward_flops
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
    config = AdaPonderConfig.from_preset("pythia-70m", num_passes=passes, adaptive=passes > 1)
    if kind == "hf":
        hf_config = GPTNeoXConfig(
            **{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            rotary_pct=config.rotary_pct,
            max_position_embeddings=config.max_position_embeddings,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        )
        model = ds.build_model(lambda: GPTNeoXForCausalLM(hf_config), ds_config)
    else:
        model = ds.build_model(lambda: AdaPonderForCausalLM(config), ds_config)
    engine = ds.Engine(model, [{"params": list(model.parameters())}], ds_config)
    engine.train()
    generator = torch.Generator().manual_seed(dist.rank())
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)

    def step() -> None:
        if kind == "hf":
            out = engine(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        else:
            out = engine(
                input_ids=tokens[:, :-1],
                labels=tokens[:, 1:],
                shift_labels=False,
                ponder_lambda=0.1,
                ponder_k=0.1,
            )
        engine.backward(out.loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - started) / args.steps
    real = torch.ones(args.micro_batch, args.seq_len, dtype=torch.bool)
    active = torch.ones(passes, args.micro_batch, args.seq_len, dtype=torch.bool)
    flops = float(forward_flops(config, active, real)["dense_total"])  # K=1: GPT-NeoX's own forward
    result = {
        "step_seconds": seconds,
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
        f"- ours K=1 vs GPT-NeoX step (same FLOPs): x{k1['step_seconds'] / hf['step_seconds']:.2f}",
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
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
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
