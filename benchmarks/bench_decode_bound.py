"""Batch-1 decoding against the memory-bandwidth bound: pythia-70m shape, fp32, random weights, CPU.

A decode step reads every weight it uses once (K backbones, a gate per continuing pass, the head
and the embedding table per mixture, the head for the logits) plus the cached K/V; the bound is
those bytes (`model.accounting.decode_bytes`, from the passes each token ran) over the read bandwidth
the script measures itself, on the same thread count: the median over reps of the faster of a
`sum` and a matrix-vector product (`mv`) over a buffer larger than the last-level cache.

Configurations, each side by side in one run (decode steps interleaved, median over reps):
  - K = 1: `transformers.GPTNeoXForCausalLM` (DynamicCache) and ours (same weights), through the
    general cached forward (old path: `fast_decode=False`, with the per-call statistics) and the
    decode step (model.ponder.decode_step, without statistics, as generate() calls it).
  - K = 4 (gate 0 random, the later gates open; tau at the f-quantile of gate 0 on the measured
    tokens, as benchmarks/bench_inference.py): f = 0 and f = 0.5, old path / decode step.

    python benchmarks/bench_decode_bound.py --threads 1 --reps 3
    python benchmarks/bench_decode_bound.py --profile   # + torch.profiler per-op table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_inference import (
    PRESET,
    first_gate_values,
    halting_model,
    hf_decoder,
    lockstep,
    one_pass_models,
    threshold_for,
)

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.accounting import decode_bytes
from model.inference import AdaPonderCache

clock = time.process_time  # CPU time of this process: other processes' load inflates it far less


def read_bandwidth(buffer_f32: torch.Tensor) -> dict[str, float]:
    """GB/s of one pass over the buffer by `sum` and by `mv` (as a [n / 512, 512] matrix)."""
    matrix, vector = buffer_f32.view(-1, 512), torch.ones(512)
    out = {}
    for name, fn in (("sum", buffer_f32.sum), ("mv", lambda: torch.mv(matrix, vector))):
        start = clock()
        fn()
        out[name] = buffer_f32.numel() * 4 / (clock() - start) / 1e9
    return out


Stepper = Callable[[int], object]


def ours_decoder(
    model: AdaPonderForCausalLM,
    ids_BT: torch.Tensor,
    prompt: int,
    tau: float,
    path: str,
    caches: dict[str, AdaPonderCache],
    name: str,
) -> Callable[[], Stepper]:
    """path "old": the general cached forward with statistics; "new": the decode step, as generate()
    calls it. The last cache is kept in `caches[name]` (passes per token, for the byte count)."""
    kwargs = dict(halt_threshold=tau, logits_to_keep=1)
    kwargs.update(fast_decode=False) if path == "old" else kwargs.update(output_halting=False)

    def start() -> Stepper:
        cache = AdaPonderCache(model.config, max_length=ids_BT.shape[1])
        model(ids_BT[:, :prompt], cache=cache, halt_threshold=tau, logits_to_keep=1)
        caches[name] = cache

        def step(t: int) -> None:
            model(ids_BT[:, t : t + 1], cache=cache, **kwargs)

        return step

    return start


def bytes_per_token(config: AdaPonderConfig, cache: AdaPonderCache, prompt: int) -> tuple[float, float]:
    """Mean passes and bytes read per decoded token, from the passes the cache recorded."""
    passes_1T = cache.passes[:, prompt:]
    k = config.num_passes
    active_K1T = torch.arange(k)[:, None, None] < passes_1T
    context_1T = torch.arange(prompt, cache.get_seq_length())[None] + 1
    total = decode_bytes(config, active_K1T, context_1T)["total"]
    return float(passes_1T.float().mean()), float(total) / passes_1T.numel()


def hf_bytes_per_token(ours_k1: AdaPonderForCausalLM, prompt: int, steps: int) -> float:
    """Pythia's decode reads what ours does at K = 1."""
    active = torch.ones(1, 1, steps, dtype=torch.bool)
    context = torch.arange(prompt, prompt + steps)[None] + 1
    return float(decode_bytes(ours_k1.config, active, context)["total"]) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per rep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--buffer-mib", type=int, default=1024, help="bandwidth buffer (above the L3)")
    parser.add_argument("--profile", action="store_true", help="per-op profile of the eager decode steps")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import bench_inference

    bench_inference.clock = clock  # lockstep's timer
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU clock, {PRESET} shape, fp32")

    hf, ours_k1 = one_pass_models()
    model_k4 = halting_model()
    vocab = model_k4.config.vocab_size
    total = args.prompt + args.steps
    ids = torch.randint(0, vocab, (1, total), generator=torch.Generator().manual_seed(1))
    s_decode = first_gate_values(model_k4, ids)[:, args.prompt :]
    taus = {f: threshold_for(s_decode, f) for f in (0.0, 0.5)}
    paths = ["old", "new"]

    caches: dict[str, AdaPonderCache] = {}
    starts: dict[str, Callable[[], Stepper]] = {"K=1 transformers": hf_decoder(hf, ids, args.prompt)}
    for path in paths:
        name = f"K=1 ours {path}"
        starts[name] = ours_decoder(ours_k1, ids, args.prompt, 0.0, path, caches, name)
    for f, tau in taus.items():
        for path in paths:
            name = f"K=4 f={f} {path}"
            starts[name] = ours_decoder(model_k4, ids, args.prompt, tau, path, caches, name)

    buffer = torch.ones(args.buffer_mib * 2**20 // 4)
    bandwidth = [read_bandwidth(buffer)]
    steps = range(args.prompt, total)
    per_rep: dict[str, list[float]] = {name: [] for name in starts}
    for rep in range(args.reps + 1):  # rep 0 warms up
        times = lockstep(starts, steps, 1, warm_up=False)
        bandwidth.append(read_bandwidth(buffer))
        if rep:
            for name, t in times.items():
                per_rep[name] += t
    del buffer
    sums = [b["sum"] for b in bandwidth[1:]]
    mvs = [b["mv"] for b in bandwidth[1:]]
    gbs = statistics.median(max(s, m) for s, m in zip(sums, mvs))

    print(
        f"read bandwidth, 1 thread, {args.buffer_mib} MiB buffer, median of {len(sums)}: "
        f"sum {statistics.median(sums):.1f} GB/s, mv {statistics.median(mvs):.1f} GB/s; "
        f"bound uses {gbs:.1f} GB/s\n"
    )
    print(
        "| configuration | mean passes | ms / token | MB read / token | achieved GB/s | fraction of bound "
        "| vs old path |"
    )
    print("|---|---|---|---|---|---|---|")
    old_ms = {}
    for name, times in per_rep.items():
        ms = statistics.median(times) * 1e3
        if name.startswith("K=1 transformers"):
            passes, nbytes = 1.0, hf_bytes_per_token(ours_k1, args.prompt, args.steps)
        else:
            config = (ours_k1 if name.startswith("K=1") else model_k4).config
            passes, nbytes = bytes_per_token(config, caches[name], args.prompt)
        group = name.rsplit(" ", 1)[0].removesuffix(" ours")
        if name.endswith(" old"):
            old_ms[group] = ms
        achieved = nbytes / (ms / 1e3) / 1e9
        vs_old = f"{old_ms[group] / ms:.2f}x" if group in old_ms and not name.endswith(" old") else ""
        print(
            f"| {name} | {passes:.2f} | {ms:.2f} | {nbytes / 1e6:.0f} | {achieved:.1f} | "
            f"{achieved / gbs:.2f} | {vs_old} |"
        )
    hf_ms, new_ms = (statistics.median(per_rep[n]) for n in ("K=1 transformers", "K=1 ours new"))
    print(f"\nK = 1, decode step / transformers: {new_ms / hf_ms:.2f} of its time per token")
    if args.profile:
        profile(ours_k1, model_k4, ids, args.prompt, taus)
    return 0


def profile(ours_k1, model_k4, ids, prompt, taus) -> None:
    """Per-op self CPU time of decode steps (the new path), per configuration."""
    from torch.profiler import profile as torch_profile

    for name, model, tau in (("K=1", ours_k1, 0.0), ("K=4 f=0", model_k4, taus[0.0])):
        cache = AdaPonderCache(model.config, max_length=ids.shape[1])
        model(ids[:, :prompt], cache=cache, halt_threshold=tau)
        steps = range(prompt, min(prompt + 8, ids.shape[1]))
        with torch_profile() as prof:
            for t in steps:
                model(ids[:, t : t + 1], cache=cache, halt_threshold=tau, output_halting=False)
        print(f"\n{name}, decode step, {len(steps)} steps, self CPU time per op:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    sys.exit(main())
