"""adaponder-generate: complete prompts with an AdaPonderLM, PonderLM or Pythia checkpoint, showing how
many passes each generated token took.

Generation runs through `transformers`' `generate()` with the model's per-pass KV cache, so halted
tokens are never computed (model/inference.py). The passes shown for a generated token are those of
the position whose output chose it (the forward that produced it). On a terminal each token is
coloured by its passes; otherwise each token is followed by its count, as `token[3]`.

    adaponder-generate --model runs/70m/hf --prompt "The capital of France is" --max-new-tokens 20
    adaponder-generate --model runs/70m [--tag step-00001000] --prompt "..."   # a run's checkpoint
    echo "Once upon a time" | adaponder-generate --model DIR --temperature 0.8 --top-p 0.95 --seed 1

`--speculative N`: self-speculative decoding (model/speculative.py), pass 1 drafting N tokens that the
remaining passes verify; the same tokens as without it when greedy, the same distribution when sampling.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import PreTrainedTokenizerBase

from model import AdaPonderForCausalLM
from model.inference import AdaPonderCache
from training import loading
from training.loading import load_tokenizer

# Terminal colours for 1, 2, 3, ... passes (green = cheapest); counts beyond the list reuse the last.
_COLOURS = ("\033[32m", "\033[36m", "\033[33m", "\033[35m", "\033[31m")
_RESET = "\033[0m"


def load_model(path: str, device: str, tag: str | None = None) -> AdaPonderForCausalLM:
    """A run directory (`tag` or its newest checkpoint), an export or a Pythia / PonderLM directory."""
    return loading.load_model(path, tag).model.to(device).eval()


def generate(
    model: AdaPonderForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    sampling: dict[str, float] | None,
    speculative: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Per prompt, the generated token ids (up to and excluding EOS) and the passes of each;
    `speculative` > 0 drafts that many tokens per step with pass 1."""
    tokenizer.padding_side = "left"  # generate() continues from the last column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    empty = [i + 1 for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()) if n == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty} give no tokens: a prompt needs at least one token to continue")
    positions = model.config.max_position_embeddings
    prompt_tokens = batch["input_ids"].shape[1]
    if prompt_tokens + max_new_tokens > positions:
        raise ValueError(
            f"the longest prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} "
            f"runs past the model's {positions} positions (max_position_embeddings): shorten the prompt "
            "or ask for fewer tokens"
        )
    cache = AdaPonderCache(model.config)
    # transformers' early-exit assisted decoding arguments, routed to model/speculative.py.
    assisted = {"assistant_early_exit": 1, "num_assistant_tokens": speculative} if speculative else {}
    sequences = model.generate(
        **batch,
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=sampling is not None,
        **(sampling or {}),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **assisted,
    )
    prompt_len = batch["input_ids"].shape[1]
    # Generated token j sits at position prompt_len + j and was chosen by position prompt_len + j - 1.
    passes_BS = cache.passes
    results = []
    for b in range(len(prompts)):
        ids = sequences[b, prompt_len:].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        passes = passes_BS[b, prompt_len - 1 : prompt_len - 1 + len(ids)].tolist()
        results.append((ids, passes))
    return results


def render(tokenizer: PreTrainedTokenizerBase, ids: list[int], passes: list[int], colour: bool) -> str:
    pieces = []
    for token, p in zip(ids, passes):
        text = tokenizer.decode([token])
        if colour:
            pieces.append(f"{_COLOURS[min(p, len(_COLOURS)) - 1]}{text}{_RESET}")
        else:
            pieces.append(f"{text}[{p}]")
    return "".join(pieces)


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="adaponder-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="run directory, export, or Pythia / PonderLM HF directory"
    )
    parser.add_argument("--tag", help="checkpoint of a run directory, e.g. step-00001000 (default: latest)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's, or its run's)")
    parser.add_argument(
        "--prompt", action="append", help="a prompt (repeatable); without it, one prompt per stdin line"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    parser.add_argument("--temperature", type=float, help="sample with this temperature")
    parser.add_argument("--top-p", type=float, help="sample from the nucleus of this probability mass")
    parser.add_argument(
        "--speculative",
        type=int,
        default=0,
        metavar="N",
        help="self-speculative decoding: pass 1 drafts N tokens per step, the other passes verify them",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser, parser.parse_args(sys.argv[1:] if argv is None else argv)


def _sampling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, float] | None:
    """generate()'s sampling arguments, or None for greedy decoding."""
    if args.temperature is None and args.top_p is None:
        return None
    if args.greedy:
        parser.error("--greedy cannot be combined with --temperature or --top-p")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return {"temperature": args.temperature or 1.0, "top_p": args.top_p or 1.0}


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)
    sampling = _sampling(parser, args)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.speculative < 0:
        parser.error(f"--speculative must be >= 0, got {args.speculative}")
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        parser.error("no prompt: pass --prompt or write prompts to stdin, one per line")
    empty = [i for i, prompt in enumerate(prompts, 1) if not prompt]
    if empty:
        parser.error(f"--prompt number {empty} is empty: a prompt needs at least one token to continue")
    torch.manual_seed(args.seed)
    try:
        loaded = loading.load_model(args.model, args.tag)
        model = loaded.model.to(args.device)
        tokenizer_path = args.tokenizer or loaded.tokenizer
        if tokenizer_path is None:
            raise ValueError(f"{args.model}: no tokenizer there or in its run config; pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
        results = generate(model, tokenizer, prompts, args.max_new_tokens, sampling, args.speculative)
    except ValueError as e:
        parser.error(str(e))
    colour = sys.stdout.isatty()
    k = model.config.num_passes
    for prompt, (ids, passes) in zip(prompts, results):
        mean = sum(passes) / max(len(passes), 1)
        print(f"{prompt}{render(tokenizer, ids, passes, colour)}")
        print(f"  ({len(ids)} tokens, {mean:.2f} of {k} passes per token)")
    if colour:
        legend = " ".join(f"{_COLOURS[min(p, len(_COLOURS)) - 1]}{p}{_RESET}" for p in range(1, k + 1))
        print(f"passes: {legend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
