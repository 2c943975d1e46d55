"""Learned halting against fixed pruning at the same mean passes per token (SPEC.md section 2 (a)).

Runs a trained AdaPonderLM on held-out text four ways, dense, in fp32:
  learned    the gates decide (1[s >= tau]);
  shuffled   the learned numbers of passes, dealt to random tokens (same histogram, no choice);
  uniform    a token runs all K passes with probability 1 - a, else exits after a uniformly drawn
             earlier pass; a is set so the mean matches the learned mean;
  geometric  after every pass a token goes on with probability c, c matched to the learned mean.
The random policies are averaged over seeds. Also prints the NLL of tokens grouped by the passes
the learned policy gave them (claim (b): early exits are the easy tokens).

    python benchmarks/eval_halting_policy.py --model EXPORTED_DIR --data SHARD_PREFIX
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from data.indexed import MMapIndexedDataset
from model import AdaPonderForCausalLM


def held_out_windows(prefix: str, tail_fraction: float, seq_len: int, count: int) -> torch.Tensor:
    """`count` consecutive (seq_len + 1)-token windows from the last documents of a shard."""
    shard = MMapIndexedDataset(prefix)
    first = int(len(shard) * (1 - tail_fraction))
    tokens = np.concatenate([shard[i] for i in range(first, len(shard))]).astype(np.int64)
    available = len(tokens) // (seq_len + 1)
    if available < 1:
        raise ValueError(
            f"{prefix}: the last {tail_fraction:.0%} of documents hold fewer than {seq_len + 1} tokens"
        )
    count = min(count, available)
    return torch.from_numpy(tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1))


def exits_from_distribution(
    probs: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
) -> torch.Tensor:
    return torch.from_numpy(rng.choice(np.arange(1, len(probs) + 1), size=shape, p=probs))


def uniform_distribution(mean: float, k: int) -> np.ndarray:
    a = min(1.0, 2 * (k - mean) / k)  # mean = K - a K / 2
    return np.array([a / (k - 1)] * (k - 1) + [1 - a])


def geometric_distribution(mean: float, k: int) -> np.ndarray:
    """P(exit after pass j) = c^(j-1) (1 - c), P(K) = c^(K-1), with sum_j c^j = mean (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        c = (low + high) / 2
        low, high = (c, high) if sum(c**j for j in range(k)) < mean else (low, c)
    return np.array([c ** (j - 1) * (1 - c) for j in range(1, k)] + [c ** (k - 1)])


@torch.no_grad()
def evaluate(model: AdaPonderForCausalLM, windows: torch.Tensor, exit_passes: torch.Tensor | None):
    out = model(
        windows[:, :-1], labels=windows[:, 1:], shift_labels=False, dense=True, exit_passes=exit_passes
    )
    return out.lm_loss.item(), out.mean_passes.item(), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="AdaPonderLM checkpoint directory (adaponder-export)")
    parser.add_argument("--data", required=True, help="shard prefix; its last documents are used")
    parser.add_argument("--tail-fraction", type=float, default=0.02, help="held-out share of documents")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    model = AdaPonderForCausalLM.from_pythia(args.model).eval()
    if not model.config.adaptive:
        raise ValueError(f"{args.model}: not an adaptive model; there is no learned policy to compare")
    k = model.config.num_passes
    windows = held_out_windows(args.data, args.tail_fraction, args.seq_len, args.samples)
    learned_loss, learned_mean, out = evaluate(model, windows, None)
    rows = [("learned", learned_mean, learned_loss, 0.0)]
    shape = tuple(out.passes.shape)
    for name in ("shuffled", "uniform", "geometric"):
        losses, means = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            if name == "shuffled":
                exits = out.passes.flatten()[torch.from_numpy(rng.permutation(out.passes.numel()))].view(
                    shape
                )
            else:
                dist = uniform_distribution if name == "uniform" else geometric_distribution
                exits = exits_from_distribution(dist(learned_mean, k), shape, rng)
            loss, mean, _ = evaluate(model, windows, exits)
            losses.append(loss)
            means.append(mean)
        rows.append((name, float(np.mean(means)), float(np.mean(losses)), float(np.std(losses))))

    print(
        f"{windows.shape[0]} windows x {args.seq_len} tokens, "
        f"last {args.tail_fraction:.0%} of the documents of {args.data}"
    )
    print("| policy | mean passes | LM loss (std over seeds) | ppl | loss - learned |")
    print("|---|---|---|---|---|")
    for name, mean, loss, std in rows:
        print(
            f"| {name} | {mean:.3f} | {loss:.4f} ({std:.4f}) | {np.exp(loss):.2f} "
            f"| {loss - learned_loss:+.4f} |"
        )
    print("\n| passes run (learned) | share of tokens | mean NLL |")
    print("|---|---|---|")
    for passes in range(1, k + 1):
        chosen = (out.passes == passes) & out.loss_mask
        if chosen.any():
            share = chosen.float().mean().item()
            print(f"| {passes} | {share:.1%} | {out.token_nll[chosen].mean().item():.3f} |")


if __name__ == "__main__":
    main()
