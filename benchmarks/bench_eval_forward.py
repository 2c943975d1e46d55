"""The eval forward on an lm-eval loglikelihood workload: skipping halted tokens against dense.

What `lm-eval` (and `adaponder-eval --tasks`) calls: `model(inps).logits` in eval mode under
`no_grad`, on a batch of scored continuations right-padded to the longest, without an attention
mask. The default eval forward (sparse: each pass runs only the still-active tokens, two passes'
K/V alive: model.kv.AlignedKV) is timed against the dense forward (`dense=True`: every token in every
pass, whatever tau is), side by side (calls interleaved rep by rep, medians), on a
pythia-70m-shaped model with random weights (fp32, CPU). Gate 0 is random and tau is set to its
f-quantile over the batch, so a fraction f of the positions halts after pass 1 and the rest run
all K = 4 passes (later gates open; `halting_model` of benchmarks/bench_inference.py). The passes
ideal is K / mean passes; the FLOPs ideal is the model's own `out.flops` (dense_total / total),
which also counts the head + mixture that halted tokens skip.

    python benchmarks/bench_eval_forward.py --threads 1 --clock cpu --reps 3
"""

from __future__ import annotations

import argparse
import sys

import bench_inference
import torch
from bench_inference import CLOCKS, first_gate_values, halting_model, medians, run_interleaved, threshold_for


def loglikelihood_batch(batch: int, shortest: int, longest: int, vocab: int, seed: int) -> torch.Tensor:
    """Context + continuation token ids of `batch` requests, lengths spread over [shortest,
    longest], sorted longest first and right-padded with 0 as lm-eval's HFLM batches them."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(longest, shortest, batch).round().long().tolist()
    ids_BT = torch.zeros(batch, longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids_BT[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
    return ids_BT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shortest", type=int, default=256)
    parser.add_argument("--longest", type=int, default=512)
    parser.add_argument("--fractions", default="0,0.1,0.5", help="fractions halted after pass 1")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_inference.clock = CLOCKS[args.clock]

    model = halting_model()
    k = model.config.num_passes
    ids_BT = loglikelihood_batch(args.batch, args.shortest, args.longest, model.config.vocab_size, seed=0)
    gates_BT = first_gate_values(model, ids_BT)
    fractions = [float(f) for f in args.fractions.split(",")]
    taus = {f: threshold_for(gates_BT, f) for f in fractions}

    stats: dict[float, dict[str, float]] = {}

    def call(f: float, dense: bool) -> float:
        def forward() -> None:
            with torch.no_grad():
                out = model(ids_BT, dense=dense, halt_threshold=taus[f])
            flops_ideal = float(out.flops["dense_total"] / out.flops["total"])
            stats[f] = {"passes": float(out.mean_passes), "flops_ideal": flops_ideal}

        return bench_inference.elapsed(forward)

    # The dense forward runs every token in every pass whatever tau is: one configuration serves all f.
    configs = {"dense": lambda: call(fractions[0], True)}
    configs |= {f"sparse {f}": lambda f=f: call(f, False) for f in fractions}
    times = medians(run_interleaved(configs, args.reps))

    print(
        f"pythia-70m shape, K = {k}, fp32, batch {args.batch} x {args.shortest}..{args.longest} tokens "
        f"(right-padded to {args.longest}, no mask), {args.threads} thread(s), clock {args.clock}, "
        f"median of {args.reps}"
    )
    print(
        "| f halted after pass 1 | mean passes | dense (s) | skip halted (s) | speedup | "
        "passes ideal (K / passes) | speedup / passes ideal | FLOPs ideal | speedup / FLOPs ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f in fractions:
        dense, sparse = times["dense"], times[f"sparse {f}"]
        passes, flops_ideal = stats[f]["passes"], stats[f]["flops_ideal"]
        speedup, ideal = dense / sparse, k / passes
        print(
            f"| {f:.2f} | {passes:.2f} | {dense:.2f} | {sparse:.2f} | {speedup:.2f}x | {ideal:.2f}x "
            f"| {speedup / ideal:.2f} | {flops_ideal:.2f}x | {speedup / flops_ideal:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
