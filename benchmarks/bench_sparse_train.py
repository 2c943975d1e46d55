"""Sparse vs dense training step (forward + backward), side by side in one run.

    python benchmarks/bench_sparse_train.py [--seq-len 256 --batch 1 --vocab 4096 --threads 1 2]

pythia-70m shape (D 512, 6 layers, K = 4) with a smaller vocabulary by default so that the backbone's
matmuls dominate as at larger scales (`--vocab 50304` for Pythia's). A fraction f of the tokens, at
random positions, stops after pass 1 (`exit_passes`), the rest runs all 4 passes; the same batch and
pattern go to the dense step (`dense=True`) and the sparse one (`dense=False`), interleaved. "paper"
is f = 1/12: 3.75 passes per token, the paper's halting rate.

Ideals, as times: the dense step x (mean passes / K) ("passes ideal") and the dense step x (the
forward FLOPs as run adaptively / the dense forward FLOPs) ("FLOPs ideal", out.flops: head and
mixture included). Columns report ideal / sparse time: 1.0 means the ideal is reached. Each case is
timed by the wall clock and by the process's CPU time (less disturbed by other jobs on a shared
machine; with 2 threads it counts both threads' work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import AdaPonderConfig, AdaPonderForCausalLM  # noqa: E402

FRACTIONS = {"0": 0.0, "paper": 1 / 12, "0.25": 0.25, "0.5": 0.5, "0.75": 0.75}


def step_seconds(model, ids, exits, dense: bool) -> tuple[tuple[float, float], object]:
    """(wall, process CPU) seconds of one forward + backward, and its output."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1, exit_passes=exits, dense=dense)
    out.loss.backward()
    seconds = (time.perf_counter() - wall, time.process_time() - cpu)
    model.zero_grad(set_to_none=True)
    return seconds, out


def measure(model, ids, f: float, repeats: int) -> dict[str, float]:
    k = model.config.num_passes
    generator = torch.Generator().manual_seed(0)
    exits = torch.where(torch.rand(ids.shape, generator=generator) < f, 1, k)
    times = {True: [], False: []}
    step_seconds(model, ids, exits, True)  # warm-up
    _, out = step_seconds(model, ids, exits, False)
    for _ in range(repeats):
        for dense in (True, False):
            times[dense].append(step_seconds(model, ids, exits, dense)[0])
    result = {"mean_passes": float(out.mean_passes)}
    for clock, name in ((0, "wall"), (1, "cpu")):
        dense_s = statistics.median(t[clock] for t in times[True])
        sparse_s = statistics.median(t[clock] for t in times[False])
        passes_ideal = dense_s * float(out.mean_passes) / k
        flops_ideal = dense_s * float(out.flops["total"] / out.flops["dense_total"])
        result[name] = (
            dense_s,
            sparse_s,
            dense_s / sparse_s,
            passes_ideal / sparse_s,
            flops_ideal / sparse_s,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path and case (median)")
    parser.add_argument("--fractions", nargs="+", choices=FRACTIONS, default=list(FRACTIONS))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AdaPonderConfig.from_preset("pythia-70m", vocab_size=args.vocab, num_passes=4)
    model = AdaPonderForCausalLM(config).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    print(
        f"pythia-70m shape, vocab {args.vocab}, K=4, fp32, batch {args.batch} x seq {args.seq_len}, "
        f"forward + backward, median of {args.repeats}\n"
    )
    print(
        "| threads | f halted after pass 1 | mean passes | clock | dense s | sparse s | dense / sparse "
        "| passes ideal / sparse | FLOPs ideal / sparse |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.fractions:
            r = measure(model, ids, FRACTIONS[name], args.repeats)
            for clock in ("wall", "cpu"):
                dense_s, sparse_s, speedup, of_passes, of_flops = r[clock]
                print(
                    f"| {threads} | {name} | {r['mean_passes']:.2f} | {clock} | {dense_s:.2f} "
                    f"| {sparse_s:.2f} | {speedup:.2f} | {of_passes:.2f} | {of_flops:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
