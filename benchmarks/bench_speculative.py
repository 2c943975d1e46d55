"""Self-speculative decoding from pass 1 against plain cached decoding, tokens per second (CPU, fp32).

Batch 1 (or `--batch-size` prompts per generate() call), greedy, `--new-tokens` per prompt, no EOS.
For every model: plain `generate()` and `generate(assistant_early_exit=1, num_assistant_tokens=n)`
for n = 1..8, interleaved rep by rep (medians), with the acceptance rate (drafts the full model
agreed with), tokens per verify cycle and a check that the tokens are identical to plain decoding.
Rows "n=4 gen." and "n=8 gen." draft through the general cached path instead of the decode step.

Models (a random one says nothing about acceptance):
  - tiny-trained: K = 4, D = 64, 2 layers, byte-level vocabulary, trained here for `--train-steps`
    steps on this Python installation's standard-library sources with the ponder loss.
  - each `--model DIR`: a trained Hugging Face directory with its tokenizer, e.g. the quickstart's
    (`adaponder-quickstart`, then `adaponder-export runs/quickstart DIR`).

    python benchmarks/bench_speculative.py --model /tmp/quickstart_hf
    python benchmarks/bench_speculative.py --model /tmp/quickstart_hf --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

from model import AdaPonderConfig, AdaPonderForCausalLM, speculative
from model.inference import AdaPonderCache
from model.speculative import speculative_loop

DRAFTS = range(1, 9)
GENERAL_DRAFTS = (4, 8)  # also timed with drafts through the general cached path ("gen.")


def stdlib_text(max_bytes: int) -> str:
    """Python sources of this installation's standard library (a few MB of real text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(parts)


def train_tiny(steps: int, seed: int = 0) -> AdaPonderForCausalLM:
    """K = 4 adaptive model on byte-level stdlib text: language modelling, then the ponder loss."""
    torch.manual_seed(seed)
    config = AdaPonderConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        gate_intermediate_size=16,
        max_position_embeddings=256,
        num_passes=4,
    )
    model = AdaPonderForCausalLM(config).train()
    data = torch.tensor(list(stdlib_text(2_000_000).encode()[:2_000_000]), dtype=torch.long)
    data = data.clamp(max=255)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq_len, batch = 64, 16
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, data.numel() - seq_len, (batch,))
        ids = torch.stack([data[o : o + seq_len] for o in offsets])
        ponder_k = 0.0 if step < steps // 2 else 0.1  # halting after a language-modelling stage
        out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=ponder_k)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    print(
        f"tiny-trained: {steps} steps in {time.perf_counter() - start:.0f} s, "
        f"last lm loss {out.lm_loss.item():.2f}, mean passes {out.mean_passes.item():.2f}"
    )
    return model.eval()


def prompts_for(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens: stdlib snippets, bytes without a tokenizer."""
    text = stdlib_text(200_000)
    starts = [i * len(text) // (count + 1) for i in range(1, count + 1)]
    prompts = []
    for s in starts:
        snippet = text[s : s + 40 * length]
        ids = list(snippet.encode()) if tokenizer is None else tokenizer(snippet)["input_ids"]
        prompts.append(torch.tensor([ids[:length]]))
    return prompts


def batched(prompts: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Groups of `size` equal-length prompts, one [size, T] tensor each."""
    return [torch.cat(prompts[i : i + size]) for i in range(0, len(prompts), size)]


@contextmanager
def drafts_through(general: bool) -> Iterator[None]:
    """With `general`, drafts run through the general cached path (model.ponder.ponder_packed) rather than the
    decode step (model.ponder.decode_step): the same tokens, to show what the decode step gains."""
    original = speculative._draft
    if general:
        speculative._draft = lambda model, ids, cache, tau: (
            speculative._cached_call(model, ids, cache, tau, 1).h_out
        )
    try:
        yield
    finally:
        speculative._draft = original


def timed_generation(model, prompts, gen, extra) -> float:
    extra = dict(extra)
    with drafts_through(extra.pop("general_drafts", False)):
        start = time.perf_counter()
        for p in prompts:
            model.generate(p, **gen, **extra)
        return time.perf_counter() - start


def bench_model(name: str, model: AdaPonderForCausalLM, prompts: list[torch.Tensor], args) -> None:
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    configs = {"plain": {}} | {
        f"n={n}": {"assistant_early_exit": 1, "num_assistant_tokens": n} for n in DRAFTS
    }
    configs |= {
        f"n={n} gen.": {"assistant_early_exit": 1, "num_assistant_tokens": n, "general_drafts": True}
        for n in GENERAL_DRAFTS
    }
    with torch.no_grad():
        reference = [model.generate(p, **gen) for p in prompts]
        identical, stats = {}, {}
        for label, extra in configs.items():
            options = {k: v for k, v in extra.items() if k != "general_drafts"}
            with drafts_through(extra.get("general_drafts", False)):
                identical[label] = all(
                    torch.equal(model.generate(p, **gen, **options), r) for p, r in zip(prompts, reference)
                )
                if extra:
                    stats[label] = [
                        _speculate(model, p, extra["num_assistant_tokens"], args.new_tokens) for p in prompts
                    ]
        times = {label: [] for label in configs}
        for _ in range(args.reps):
            for label, extra in configs.items():
                times[label].append(timed_generation(model, prompts, gen, extra))
    tokens = args.new_tokens * sum(p.shape[0] for p in prompts)
    plain = statistics.median(times["plain"])
    passes = float(torch.cat([_passes(model, p, r) for p, r in zip(prompts, reference)]).float().mean())
    print(
        f"\n{name}: batch {prompts[0].shape[0]}, {sum(p.shape[0] for p in prompts)} prompts x "
        f"{args.new_tokens} new tokens, greedy; "
        f"mean passes of the generated tokens {passes:.2f} of {model.config.num_passes}"
    )
    print(
        f"{'decoding':>9} | {'tokens/s':>8} | {'x plain':>7} | {'accepted':>8} | {'tok/cycle':>9} | identical"
    )
    for label in configs:
        t = statistics.median(times[label])
        if label == "plain":
            accept, per_cycle = "", ""
        else:
            s = stats[label]
            accept = f"{sum(x.agreed for x in s) / sum(x.drafted for x in s):.2f}"
            per_cycle = f"{sum(x.emitted for x in s) / sum(x.cycles for x in s):.2f}"
        print(
            f"{label:>9} | {tokens / t:8.1f} | {plain / t:7.2f} | {accept:>8} | {per_cycle:>9} | "
            f"{'yes' if identical[label] else 'NO'}"
        )


def _speculate(model, ids, n, new_tokens):
    """Acceptance statistics of one greedy self-speculative generation (the loop generate() runs)."""
    cache = AdaPonderCache(model.config, ids.shape[1] + new_tokens)
    out = model(ids, cache=cache, logits_to_keep=1)
    stopping = StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + new_tokens)])
    tau, num_run = model.compute_knob(None, None)
    _, stats = speculative_loop(
        model, ids, cache, out.logits[:, -1], n, LogitsProcessorList(), stopping, False, None, tau, num_run
    )
    return stats


def _passes(model, prompt, sequence):
    """Passes the full model runs for the positions that chose the generated tokens."""
    out = model(sequence[:, :-1])
    return out.passes[:, prompt.shape[1] - 1 :].flatten()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="trained HF directory (repeatable)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, fp32")
    for path in args.model:
        model = AdaPonderForCausalLM.from_pretrained(path).float().eval()
        prompts = prompts_for(AutoTokenizer.from_pretrained(path), args.prompts, args.prompt_tokens)
        bench_model(Path(path).name, model, batched(prompts, args.batch_size), args)
    model = train_tiny(args.train_steps)
    prompts = prompts_for(None, args.prompts, args.prompt_tokens)
    bench_model("tiny-trained", model, batched(prompts, args.batch_size), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
