"""Adaptive inference on the clock: a pythia-70m-shaped AdaPonderLM (random weights, fp32, CPU).

Three measurements, each side by side in one run (configurations interleaved rep by rep, medians):

1. Halting speedup. Gate 0 is random and the threshold tau is set to the f-quantile of the gate values
   of the measured tokens, so a fraction f of them halts after the first pass; the other gates are
   open (s ~ 1), so the rest run all K = 4 passes. f = 0 (tau = 0: nobody halts) is the same model
   with every token running all passes. Decode (batch 1, one token per step after a prompt) and
   prefill (a batch of prompts, one forward) are timed; the ideal speedup is K / mean passes, the
   saving in passes (a FLOPs ideal, which also counts the skipped head + mixture, is shown too).
2. Per-token decode time with the per-pass KV cache against recomputing the whole prefix with all K
   passes for every token (PonderLM's released generation), plain PonderLM (K = 4, no gates).
3. K = 1 (Pythia): `transformers.GPTNeoXForCausalLM` against this model, same weights, in a decode
   loop with each model's cache and through `generate()`.

    python benchmarks/bench_inference.py              # all three, a few minutes on 2 cores
    python benchmarks/bench_inference.py --only halting --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import GPTNeoXForCausalLM

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.hf_compat import gpt_neox_config
from model.inference import AdaPonderCache

PRESET = "pythia-70m"
FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def halting_model(seed: int = 0) -> AdaPonderForCausalLM:
    """K = 4 with a random first gate (s^0 spread over (0, 1)) and the later gates wide open."""
    torch.manual_seed(seed)
    model = AdaPonderForCausalLM(AdaPonderConfig.from_preset(PRESET, num_passes=4)).eval()
    with torch.no_grad():
        first = model.ponder_gates[0].dense_out
        first.weight.normal_(0.0, 0.1)
        first.bias.zero_()
        for gate in model.ponder_gates[1:]:
            gate.dense_out.weight.zero_()
            gate.dense_out.bias.fill_(30.0)
    return model


def threshold_for(gates_N: torch.Tensor, fraction: float) -> float:
    """tau under which exactly round(fraction * N) of these gate values fall."""
    values = gates_N.flatten().sort().values
    k = round(fraction * values.numel())
    if k == 0:
        return 0.0
    if k == values.numel():
        return min(float(values[-1]) * 1.01, 0.999)
    return float(values[k - 1] + values[k]) / 2


def first_gate_values(model: AdaPonderForCausalLM, ids_BT: torch.Tensor) -> torch.Tensor:
    """s^0 of every position; pass 0 runs every token whatever tau is, so these are the same in
    every configuration."""
    model.config.halt_threshold = 0.0
    with torch.no_grad():
        return model(ids_BT, dense=True).gates[0]


# The clock: wall time, or this process's CPU time (all its threads), which other processes' load on a
# shared machine inflates far less; with one thread there is no spin-waiting in it either.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def elapsed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = clock()
    fn()
    return clock() - start


def run_interleaved(configs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Seconds of each configuration in every rep, alternating configurations within a rep so that
    the load of other processes on the machine hits all of them alike. One warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for fn in configs.values():
        fn()  # warm-up: first-call allocations and kernel selection
    for _ in range(reps):
        for name, fn in configs.items():
            times[name].append(fn())
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


Stepper = Callable[[int], object]  # runs decode step t of one configuration


def lockstep(
    starts: dict[str, Callable[[], Stepper]], steps: range, reps: int, warm_up: bool = True
) -> dict[str, list[float]]:
    """Seconds per decode step of each configuration in every rep. `starts[name]()` prefills
    (untimed) and returns its stepper; within a rep the configurations take turns step by step, so
    that other processes' load hits all of them alike. An extra first rep warms up if asked."""
    per_rep: dict[str, list[float]] = {name: [] for name in starts}
    for rep in range(0 if warm_up else 1, reps + 1):
        steppers = {name: start() for name, start in starts.items()}
        totals = dict.fromkeys(starts, 0.0)
        for t in steps:
            for name, step in steppers.items():
                totals[name] += elapsed(lambda step=step, t=t: step(t))
        if rep:
            for name, total in totals.items():
                per_rep[name].append(total / len(steps))
    return per_rep


# --------------------------------------------------------------------------------------------------
# 1. Halting speedup, decode and prefill.


def halting_decoder(
    model: AdaPonderForCausalLM, ids_BT: torch.Tensor, prompt: int, tau: float, stats: dict[str, float]
) -> Callable[[], Stepper]:
    """Decoding with threshold tau (set before every call: the configurations share the model);
    records mean passes and FLOPs per decoded token in `stats`."""

    def start() -> Stepper:
        model.config.halt_threshold = tau
        cache = AdaPonderCache(model.config, max_length=ids_BT.shape[1])
        model(ids_BT[:, :prompt], cache=cache, logits_to_keep=1)
        stats.update(passes=0.0, flops=0.0)
        steps = ids_BT.shape[1] - prompt

        def step(t: int) -> None:
            model.config.halt_threshold = tau
            out = model(ids_BT[:, t : t + 1], cache=cache, logits_to_keep=1)
            stats["passes"] += float(out.mean_passes) / steps
            stats["flops"] += float(out.flops["total"]) / steps

        return step

    return start


def prefill(model: AdaPonderForCausalLM, ids_BT: torch.Tensor, tau: float, stats: dict[str, float]) -> float:
    model.config.halt_threshold = tau
    start = clock()
    out = model(ids_BT, cache=AdaPonderCache(model.config), logits_to_keep=1)
    elapsed = clock() - start
    stats.update(passes=float(out.mean_passes), flops=float(out.flops["total"]))
    return elapsed


def halting_table(
    title: str, seconds: dict[float, float], stats: dict[float, dict[str, float]], unit: str
) -> list[str]:
    k = 4
    base_time, base_flops = seconds[0.0], stats[0.0]["flops"]
    lines = [
        f"{title}",
        "",
        f"| f halted after pass 1 | mean passes | {unit} | speedup vs all passes | ideal (K / passes) "
        "| speedup / ideal | FLOPs ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FRACTIONS:
        speedup = base_time / seconds[f]
        ideal = k / stats[f]["passes"]
        flops_ideal = base_flops / stats[f]["flops"]
        lines.append(
            f"| {f:.2f} | {stats[f]['passes']:.2f} | {seconds[f] * 1e3:.1f} | {speedup:.2f}x | {ideal:.2f}x "
            f"| {speedup / ideal:.2f} | {flops_ideal:.2f}x |"
        )
    return lines


def bench_halting(args: argparse.Namespace) -> list[str]:
    model = halting_model()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    decode_ids = torch.randint(0, vocab, (1, args.prompt + args.decode_steps), generator=gen)
    prefill_ids = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), generator=gen)
    s_decode = first_gate_values(model, decode_ids)[:, args.prompt :]
    s_prefill = first_gate_values(model, prefill_ids)
    decode_stats = {f: {} for f in FRACTIONS}
    prefill_stats = {f: {} for f in FRACTIONS}
    decode_tau = {f: threshold_for(s_decode, f) for f in FRACTIONS}
    prefill_tau = {f: threshold_for(s_prefill, f) for f in FRACTIONS}
    decode = medians(
        lockstep(
            {
                f: halting_decoder(model, decode_ids, args.prompt, decode_tau[f], decode_stats[f])
                for f in FRACTIONS
            },
            range(args.prompt, args.prompt + args.decode_steps),
            args.reps,
        )
    )
    pre = medians(
        run_interleaved(
            {
                f: (lambda f=f: prefill(model, prefill_ids, prefill_tau[f], prefill_stats[f]))
                for f in FRACTIONS
            },
            args.reps,
        )
    )
    return [
        *halting_table(
            f"Decode, batch 1, {args.decode_steps} steps after a {args.prompt}-token prompt "
            f"(median of {args.reps}):",
            decode,
            decode_stats,
            "ms / token",
        ),
        "",
        *halting_table(
            f"Prefill, batch {args.prefill_batch} x {args.prefill_len} tokens (median of {args.reps}):",
            pre,
            prefill_stats,
            "ms / prefill",
        ),
    ]


# --------------------------------------------------------------------------------------------------
# 2. Cache against recomputing the prefix.


def bench_recompute(args: argparse.Namespace) -> list[str]:
    torch.manual_seed(2)
    model = AdaPonderForCausalLM(AdaPonderConfig.from_preset(PRESET, num_passes=4, adaptive=False)).eval()
    lines = [
        "Plain PonderLM (K = 4), batch 1: a decode step at a given context length, with the cache or "
        "recomputing the whole prefix (dense, all passes, head on the last position only); 2 steps, "
        "median over reps.",
        "",
        "| context | with cache (ms / token) | recompute prefix (ms / token) | cache speedup | reps |",
        "|---|---|---|---|---|",
    ]
    for i, context in enumerate(sorted(args.contexts)):
        steps = 2
        ids = torch.randint(0, model.config.vocab_size, (1, context + steps))
        reps = 3 if context <= 512 else 1  # recomputing 2048 tokens x 4 passes takes seconds

        def cached_decoder(ids: torch.Tensor = ids, context: int = context) -> Stepper:
            cache = AdaPonderCache(model.config, max_length=ids.shape[1])
            model(ids[:, :context], cache=cache, logits_to_keep=1)
            return lambda t: model(ids[:, t : t + 1], cache=cache, logits_to_keep=1)

        def recompute(ids: torch.Tensor = ids) -> Stepper:
            return lambda t: model(ids[:, : t + 1], dense=True, logits_to_keep=1)

        # The first (shortest) context warms the code paths up for the longer ones.
        per_step = medians(
            lockstep(
                {"cached": cached_decoder, "recompute": recompute},
                range(context, context + steps),
                reps,
                i == 0,
            )
        )
        cached, full = per_step["cached"], per_step["recompute"]
        lines.append(f"| {context} | {cached * 1e3:.1f} | {full * 1e3:.0f} | {full / cached:.0f}x | {reps} |")
    return lines


# --------------------------------------------------------------------------------------------------
# 3. K = 1 against transformers' GPT-NeoX.


def hf_decoder(hf: GPTNeoXForCausalLM, ids_BT: torch.Tensor, prompt: int) -> Callable[[], Stepper]:
    def start() -> Stepper:
        state = {"cache": hf(ids_BT[:, :prompt], use_cache=True, logits_to_keep=1).cache}

        def step(t: int) -> None:
            state["cache"] = hf(
                ids_BT[:, t : t + 1], cache=state["cache"], use_cache=True, logits_to_keep=1
            ).cache

        return step

    return start


def ours_decoder(model: AdaPonderForCausalLM, ids_BT: torch.Tensor, prompt: int) -> Callable[[], Stepper]:
    def start() -> Stepper:
        cache = AdaPonderCache(model.config)
        model(ids_BT[:, :prompt], cache=cache, logits_to_keep=1)
        return lambda t: model(ids_BT[:, t : t + 1], cache=cache, logits_to_keep=1)

    return start


def generate_time(model: torch.nn.Module, ids_BT: torch.Tensor, new: int) -> float:
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return elapsed(lambda: model.generate(ids_BT, **kwargs)) / new


def one_pass_models() -> tuple[GPTNeoXForCausalLM, AdaPonderForCausalLM]:
    """`transformers`' GPT-NeoX and this model at K = 1 with the same random pythia-70m-shaped
    weights (ours loaded from the other's saved directory, as users load Pythia)."""
    torch.manual_seed(3)
    with tempfile.TemporaryDirectory() as tmp:
        GPTNeoXForCausalLM(gpt_neox_config(AdaPonderConfig.from_preset(PRESET))).save_pretrained(tmp)
        hf = GPTNeoXForCausalLM.from_pretrained(tmp).eval()
        ours = AdaPonderForCausalLM.from_pythia(tmp, num_passes=1).eval()
    return hf, ours


def bench_one_pass(args: argparse.Namespace) -> list[str]:
    hf, ours = one_pass_models()
    ids = torch.randint(0, ours.config.vocab_size, (1, args.prompt + args.k1_steps))
    # The two are within noise of each other: twice the reps, and both the median and the best
    # (other processes' load only ever adds time).
    reps = 2 * args.reps
    loop = lockstep(
        {"transformers": hf_decoder(hf, ids, args.prompt), "ours": ours_decoder(ours, ids, args.prompt)},
        range(args.prompt, args.prompt + args.k1_steps),
        reps,
    )
    gen = run_interleaved(
        {
            "transformers": lambda: generate_time(hf, ids[:, :16], args.k1_steps),
            "ours": lambda: generate_time(ours, ids[:, :16], args.k1_steps),
        },
        reps,
    )
    rows = []
    for what, times in (
        (f"decode loop, {args.k1_steps} steps after {args.prompt} tokens", loop),
        (f"generate(), 16-token prompt + {args.k1_steps} tokens", gen),
    ):
        for stat in (statistics.median, min):
            hf_ms, ours_ms = stat(times["transformers"]) * 1e3, stat(times["ours"]) * 1e3
            rows.append(f"| {what}, {stat.__name__} | {hf_ms:.2f} | {ours_ms:.2f} | {ours_ms / hf_ms:.2f} |")
    return [
        f"K = 1, batch 1, {reps} reps: transformers.GPTNeoXForCausalLM (sdpa attention, DynamicCache) "
        "against ours, same weights.",
        "",
        "| measurement | transformers (ms / token) | ours (ms / token) | ours / transformers |",
        "|---|---|---|---|",
        *rows,
    ]


SECTIONS = {"halting": bench_halting, "recompute": bench_recompute, "one-pass": bench_one_pass}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prefill-batch", type=int, default=2)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--k1-steps", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"{PRESET} shape, fp32, random weights"
    )
    for name in args.only or list(SECTIONS):
        start = clock()
        print(
            "\n".join(["", *SECTIONS[name](args), f"({name}: {clock() - start:.0f} s)"]),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
