"""Peak memory of a training step with the chunked pondering mixture vs the [B, T, V] one it replaced.

    python benchmarks/bench_mixture_memory.py [--seq-len 512 --batch 1 --vocab 50304]

pythia-70m (D 512, 6 layers, Pythia's vocabulary 50304), K = 4, fp32, one forward + backward of the
training step (the packed strategy, nobody halting), each case in a fresh process with the host
allocator a training launch sets (training.memory.host_allocator). "before" is the mixture as it
was until commit e4aeeda: softmax(embed_out(h)) @ W_in through plain autograd, so each of the K - 1
mixtures keeps its fp32 [B, T, V] logits and probabilities for backward (under activation
checkpointing the mixture was recomputed in backward, one pass's [B, T, V] at a time). "after" is
model.mixture.ChunkedMixture: chunks of MIXTURE_CHUNK_BYTES, nothing vocabulary-sized kept.

Columns: bytes autograd saves for backward (parameters excluded; exact), and the step's peak RSS
above the RSS before it (ru_maxrss; includes the gradients, 280 MB, and allocator slack).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.utils.checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AdaPonderConfig, AdaPonderForCausalLM  # noqa: E402
from training.memory import host_allocator  # noqa: E402

CASES = ("before", "before+checkpointing", "after", "after+checkpointing")


def unchunked_mixture(self, h):
    """e4aeeda's ponder_embedding (full softmax): autograd keeps [..., V] logits and probabilities."""
    logits = self.embed_out(h).float()
    weight = self.gpt_neox.embed_in.weight
    return (logits.softmax(-1).to(weight.dtype) @ weight) * self.config.embed_scale


def recomputed_mixture(self, h):
    """e4aeeda under activation checkpointing: the whole mixture recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(unchunked_mixture, self, h, use_reentrant=False)


def worker(case: str, args: argparse.Namespace) -> dict:
    host_allocator()  # glibc's mmap threshold as a training launch sets it: freed tensors leave RSS
    torch.manual_seed(0)
    config = AdaPonderConfig.from_preset("pythia-70m", vocab_size=args.vocab, num_passes=4)
    model = AdaPonderForCausalLM(config).train()
    if "checkpointing" in case:
        model.activation_checkpointing_enable()
    if case.startswith("before"):
        mixture = recomputed_mixture if "checkpointing" in case else unchunked_mixture
        model.ponder_embedding = types.MethodType(mixture, model)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        if tensor.data_ptr() not in params:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1)
    out.loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"saved": saved, "peak_delta": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    results = {}
    for case in CASES:
        command = [sys.executable, __file__, "--worker", case, "--seq-len", str(args.seq_len)]
        command += ["--batch", str(args.batch), "--vocab", str(args.vocab)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq_len
    shape = f"batch {args.batch} x seq {args.seq_len}"
    print(f"pythia-70m, vocab {args.vocab}, K=4, fp32, {shape}, training step\n")
    print("| mixture | saved for backward MiB | step peak RSS above start MiB |")
    print("|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['saved'] / 2**20:,.0f} | {r['peak_delta'] / 2**20:,.0f} |")
    bv = tokens * args.vocab * 4 / 2**20
    print(f"\nOne fp32 [B, T, V] tensor: {bv:,.0f} MiB.")
    for mode in ("", "+checkpointing"):
        b, a = results["before" + mode], results["after" + mode]
        print(
            f"- after vs before{mode or ' (no checkpointing)'}: saved x{a['saved'] / b['saved']:.2f}, "
            f"peak x{a['peak_delta'] / b['peak_delta']:.2f}"
        )


if __name__ == "__main__":
    main()
