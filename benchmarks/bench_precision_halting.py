"""How many tokens change their number of passes between a bf16 and an fp32 forward.

The halting decision 1[s >= tau] is taken on fp32 gate values, but the hidden states the gates read
come out of a bf16 backbone in a bf16 run, so a token whose gate sits near tau can halt one pass
earlier or later. This counts those tokens: the same weights run in fp32 and in bf16 (eval forward,
packed strategy) on random token ids, gates either from a trained export (`--model DIR`, its own
tau) or random around tau = 0.5 on a tiny model (the worst case: many gates near tau).

    python benchmarks/bench_precision_halting.py
    python benchmarks/bench_precision_halting.py --model runs/quickstart/hf
"""

from __future__ import annotations

import argparse
import sys

import torch

from model import AdaPonderConfig, AdaPonderForCausalLM


def random_gates_model(seed: int) -> AdaPonderForCausalLM:
    """A tiny model whose first gates are random around tau = 0.5: tokens exit after every pass."""
    torch.manual_seed(seed)
    config = AdaPonderConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        gate_intermediate_size=64,
        halt_threshold=0.5,
    )
    model = AdaPonderForCausalLM(config)
    with torch.no_grad():
        for gate in model.ponder_gates:
            gate.dense_out.weight.normal_(0.0, 2.0)
            gate.dense_out.bias.fill_(0.8)
    return model


def passes(model: AdaPonderForCausalLM, ids_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return model.to(dtype).eval()(ids_BT).passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an exported AdaPonderLM directory (default: random tiny model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model = AdaPonderForCausalLM.from_pretrained(args.model) if args.model else random_gates_model(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids_BT = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator)
    full, half = passes(model, ids_BT, torch.float32), passes(model, ids_BT, torch.bfloat16)
    changed = full != half
    n = changed.numel()
    print(f"{args.model or 'random tiny model'}, tau {model.config.halt_threshold}, {n} tokens")
    print(f"mean passes fp32 {full.float().mean():.3f}, bf16 {half.float().mean():.3f}")
    print(f"tokens whose passes differ: {int(changed.sum())} ({changed.float().mean():.2%})")
    delta = (half - full)[changed]
    if delta.numel():
        values, counts = delta.unique(return_counts=True)
        print(f"bf16 - fp32 passes among them: {dict(zip(values.tolist(), counts.tolist()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
