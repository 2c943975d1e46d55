"""Do the gates close before pondering helps? Mean passes per token vs the gates' learning rate.

Trains the quickstart model (configs/quickstart.yaml's shape, 1.5M parameters, K = 4) on the Python
standard library's sources in one process with plain AdamW, once per gate learning-rate multiplier,
same data and seed, with the quickstart's schedule: warmup 10 steps, no ponder loss until step 40,
then lambda 0.1 with k rising to 0.1 over 30 steps. Prints LM loss and mean passes side by side.

    python benchmarks/bench_gate_lr.py --steps 100 --multipliers 1.0 0.1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.builtin_corpus import build_builtin_corpus
from data.indexed import MMapIndexedDataset
from data.preprocess import preprocess
from data.train_tokenizer import train_tokenizer
from model import AdaPonderConfig, AdaPonderForCausalLM

SEQ_LEN, BATCH, PEAK_LR, WARMUP = 128, 16, 3e-3, 10
PONDER_START, PONDER_RAMP, LAMBDA, K_MAX = 40, 30, 0.1, 0.1


def token_stream(workdir: Path) -> np.ndarray:
    corpus, tokenizer, prefix = workdir / "corpus.jsonl", workdir / "tokenizer", workdir / "shard"
    build_builtin_corpus(str(corpus), max_bytes=5_000_000)
    train_tokenizer([str(corpus)], "bpe", 2048, str(tokenizer))
    preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
    shard = MMapIndexedDataset(str(prefix))
    return np.concatenate([shard[i] for i in range(len(shard))]).astype(np.int64)


def train(
    tokens: np.ndarray, multiplier: float, steps: int, log_every: int
) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    config = AdaPonderConfig.from_preset(
        "tiny",
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
    )
    model = AdaPonderForCausalLM(config).train()
    gate_ids = {id(p) for p in model.gate_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in gate_ids], "mult": 1.0},
        {"params": list(model.gate_parameters()), "mult": multiplier},
    ]
    optimizer = torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = PEAK_LR * min(1.0, step / WARMUP) * group["mult"]
        starts = rng.integers(0, len(tokens) - SEQ_LEN - 1, BATCH)
        batch = torch.from_numpy(np.stack([tokens[s : s + SEQ_LEN + 1] for s in starts]))
        ramp = min(1.0, max(0, step - PONDER_START) / PONDER_RAMP)
        lam, k = (0.0, 0.0) if step <= PONDER_START else (LAMBDA, K_MAX * ramp)
        out = model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False, ponder_lambda=lam, ponder_k=k)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0:
            rows.append((step, out.lm_loss.item(), out.mean_passes.item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = token_stream(Path(tmp))
    results = {m: train(tokens, m, args.steps, args.log_every) for m in args.multipliers}
    header = " | ".join(f"x{m}: LM loss, passes" for m in args.multipliers)
    print(f"| step | {header} |")
    print("|---" * (1 + len(args.multipliers)) + "|")
    for i, (step, *_) in enumerate(results[args.multipliers[0]]):
        cells = " | ".join(f"{results[m][i][1]:.3f}, {results[m][i][2]:.2f}" for m in args.multipliers)
        print(f"| {step} | {cells} |")


if __name__ == "__main__":
    main()
