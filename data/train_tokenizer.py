"""``adaponder-train-tokenizer``: train a byte-level BPE or a sentencepiece tokenizer on local text.

    adaponder-train-tokenizer --input 'corpus/*.jsonl' --type bpe --vocab-size 32000 --output tok/

BPE writes a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) laid out
like Pythia's: byte-level, so any text encodes, and ``<|endoftext|>`` is id 0. Sentencepiece writes
``tokenizer.model`` (BPE with byte fallback and no normalisation, ``<|endoftext|>`` as EOS id 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.readers import add_text_arguments, expand_inputs, iter_documents

EOD_TOKEN = "<|endoftext|>"
KINDS = ("bpe", "sentencepiece")
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token")
# 256 byte symbols plus the end-of-document token.
_MIN_BPE_VOCAB = 257
# sentencepiece skips longer "sentences"; documents are fed line by line, long lines cut to this.
_SP_MAX_SENTENCE_BYTES = 1 << 14


def _train_bpe(texts: Iterator[str], vocab_size: int, output_dir: Path, progress: bool) -> None:
    if vocab_size < _MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is below {_MIN_BPE_VOCAB} (256 bytes + {EOD_TOKEN})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    # PreTrainedTokenizerFast loads in transformers 4 and 5 alike; special tokens as Pythia's config has them.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **dict.fromkeys(_SPECIAL_ROLES, EOD_TOKEN)}
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _lines(texts: Iterator[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line.encode()[:_SP_MAX_SENTENCE_BYTES].decode(errors="ignore")


def _train_sentencepiece(texts: Iterator[str], vocab_size: int, output_dir: Path) -> None:
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_prefix=str(output_dir / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            # Keep text as it is (code indentation included) so decode(encode(text)) == text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            eos_id=0,
            eos_piece=EOD_TOKEN,
            unk_id=1,
            bos_id=-1,
            pad_id=-1,
            max_sentence_length=_SP_MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from e


def train_tokenizer(
    files: list[str],
    kind: str,
    vocab_size: int,
    output_dir: str,
    text_field: str = "text",
    text_mode: str = "file",
    progress: bool = False,
) -> Path:
    """Train a "bpe" or "sentencepiece" tokenizer on ``files`` (paths or globs) into ``output_dir``."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer type {kind!r}: expected one of {KINDS}")
    texts = iter_documents(expand_inputs(files), text_field, text_mode)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        _train_bpe(texts, vocab_size, out, progress)
    else:
        _train_sentencepiece(texts, vocab_size, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaponder-train-tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="input files or globs (jsonl, txt, parquet, ...)"
    )
    parser.add_argument("--type", choices=KINDS, default="bpe", help="byte-level BPE (HF) or sentencepiece")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="output directory")
    add_text_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = train_tokenizer(
            args.input,
            args.type,
            args.vocab_size,
            args.output,
            args.text_field,
            args.text_mode,
            progress=True,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.type} tokenizer to {out}")
    return 0
