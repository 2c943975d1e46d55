"""One interface over Hugging Face ``tokenizers`` files and sentencepiece models.

Accepted paths: a Hugging Face tokenizer directory (with ``tokenizer.json``, as Pythia ships), a bare
``tokenizer.json``, a sentencepiece ``.model`` file, or a directory holding only ``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer

# Tried in order when tokenizer_config.json does not name the end-of-document token.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer(ABC):
    """``encode``/``decode`` without special tokens added, ``vocab_size`` and ``eod_id``."""

    def __init__(self, path: str, backend, vocab_size: int, eod_id: int | None):
        self.path = path
        self._backend = backend
        self.vocab_size = vocab_size
        self._eod_id = eod_id

    @property
    def eod_id(self) -> int:
        """Id appended after each document (``<|endoftext|>`` = 0 for Pythia's tokenizer)."""
        if self._eod_id is None:
            raise ValueError(
                f"{self.path}: tokenizer has no end-of-document token (looked for {_EOD_CANDIDATES})"
            )
        return self._eod_id

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer(Tokenizer):
    def __init__(self, json_path: Path):
        try:
            backend = RustTokenizer.from_file(str(json_path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{json_path}: not a readable tokenizer.json ({e})") from e
        super().__init__(
            str(json_path),
            backend,
            backend.get_vocab_size(with_added_tokens=True),
            self._find_eod(backend, json_path.parent / "tokenizer_config.json"),
        )

    @staticmethod
    def _find_eod(backend, config_path: Path) -> int | None:
        names = list(_EOD_CANDIDATES)
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_path}: not a readable tokenizer config ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: a tokenizer config must be a JSON object")
            eos = config.get("eos_token")
            # Older configs store AddedToken dicts rather than plain strings.
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                names.insert(0, eos)
        for name in names:
            token_id = backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: Path):
        try:
            backend = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a readable sentencepiece model ({e})") from e
        eos = backend.eos_id()
        super().__init__(str(model_path), backend, backend.get_piece_size(), eos if eos >= 0 else None)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode([int(i) for i in ids])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open the tokenizer at ``path``; ``ValueError`` if it is missing or of an unknown kind."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"tokenizer path {p} does not exist")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p / "tokenizer.json")
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise ValueError(f"tokenizer directory {p} holds neither tokenizer.json nor tokenizer.model")
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    raise ValueError(f"tokenizer path {p}: expected a directory, a tokenizer.json or a sentencepiece .model")
