"""The ``data`` section of the training configuration."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from data.indexed import data_path, index_path

SAMPLE_ORDERS = ("gpt-neox", "preshuffled")
PYTHIA_GLOBAL_BATCH = 1024  # samples per Pythia optimizer step (every size, 70M to 12B)


@dataclass
class DataConfig:
    """Training data: shard prefixes and their blend, the validation split, sample order, tokenizer."""

    train_paths: list[str] = field(default_factory=list)
    """Shard prefixes (``PREFIX.bin``/``PREFIX.idx`` without the suffix) blended for training."""

    train_weights: list[float] | None = None
    """Blend weight of each train prefix (normalised). None weights each prefix by its token count,
    which samples as if the shards were concatenated."""

    valid_paths: list[str] = field(default_factory=list)
    """Prefixes for validation (blended by token count). Empty: a document range of ``train_paths``."""

    test_paths: list[str] = field(default_factory=list)
    """Prefixes for test (blended by token count). Empty: a document range of ``train_paths``."""

    split: str = "969,30,1"
    """Train/valid/test proportions (``,`` or ``/`` separated, missing ones are 0) cutting every train
    prefix into contiguous document ranges. Used when ``valid_paths`` or ``test_paths`` is empty; then
    train takes the first range and each split without its own paths takes its range."""

    sample_order: str = "gpt-neox"
    """``gpt-neox``: ``seq_len + 1``-token samples cut across documents through the seeded
    doc/sample/shuffle index. ``preshuffled``: every shard item already is one sample of exactly
    ``seq_len + 1`` tokens, used in file order (Pythia's pre-shuffled Pile shards, so a run continued
    from Pythia's step N reads the data Pythia read next, from sample N x 1024)."""

    start_sample: int = 0
    """Where a fresh run starts in the training samples' global order: its first step reads samples
    ``start_sample, start_sample + 1, ...``. Recorded in every checkpoint and kept on resume."""

    start_after_pythia_step: int | None = None
    """Continue Pythia's data order after its checkpoint ``stepN``: start at sample N x 1024 (Pythia's
    global batch), so the run reads what Pythia read next. Needs ``sample_order: preshuffled``;
    excludes ``start_sample``."""

    seed: int = 1234
    """Seeds the document and sample shuffles (GPT-NeoX's ``np.random.RandomState(seed)``)."""

    cache_dir: str | None = None
    """Where sample indexes are cached. None: ``index-cache/`` beside each prefix's files."""

    allow_data_change: bool = False
    """Resume even when the dataset fingerprint in the checkpoint differs from the current data."""

    tokenizer: str | None = None
    """Tokenizer the shards were made with: HF directory, ``tokenizer.json`` or sentencepiece ``.model``."""

    num_workers: int = 1
    """DataLoader worker processes (0 loads in the training process)."""

    def split_fractions(self) -> list[float]:
        """``split`` as three fractions summing to 1; ValueError naming the field when malformed."""
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"data.split {self.split!r}: expected up to 3 numbers like '969,30,1'") from None
        if (
            not 1 <= len(values) <= 3
            or any(v < 0 or not math.isfinite(v) for v in values)
            or sum(values) <= 0
        ):
            raise ValueError(
                f"data.split {self.split!r}: expected 1 to 3 non-negative numbers with a positive sum"
            )
        values += [0.0] * (3 - len(values))
        return [v / sum(values) for v in values]

    def first_sample(self) -> int:
        """The sample a fresh run starts at (``start_sample`` or Pythia's step x 1024)."""
        if self.start_after_pythia_step is not None:
            return self.start_after_pythia_step * PYTHIA_GLOBAL_BATCH
        return self.start_sample

    def validate(self) -> None:
        """ValueError naming the field or file for anything build_datasets would trip over."""
        for name in ("train_paths", "valid_paths", "test_paths"):
            for prefix in getattr(self, name):
                if prefix.endswith((".bin", ".idx")):
                    raise ValueError(f"data.{name}: {prefix!r} should be the prefix, without .bin/.idx")
                for path in (data_path(prefix), index_path(prefix)):
                    if not os.path.isfile(path):
                        raise ValueError(f"data.{name}: {path} does not exist")
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train_paths):
                raise ValueError(
                    f"data.train_weights has {len(self.train_weights)} entries for "
                    f"{len(self.train_paths)} train_paths"
                )
            if any(not (w > 0 and math.isfinite(w)) for w in self.train_weights):
                raise ValueError(f"data.train_weights {self.train_weights}: every weight must be positive")
        self.split_fractions()
        if self.sample_order not in SAMPLE_ORDERS:
            raise ValueError(f"data.sample_order {self.sample_order!r}: expected one of {SAMPLE_ORDERS}")
        if self.start_sample < 0:
            raise ValueError(f"data.start_sample {self.start_sample}: must be >= 0")
        if self.start_after_pythia_step is not None:
            if self.start_after_pythia_step < 0:
                raise ValueError(f"data.start_after_pythia_step {self.start_after_pythia_step}: must be >= 0")
            if self.start_sample:
                raise ValueError("data.start_sample and data.start_after_pythia_step: set at most one")
            if self.sample_order != "preshuffled":
                raise ValueError(
                    "data.start_after_pythia_step follows Pythia's order only in its pre-shuffled shards: "
                    "set data.sample_order: preshuffled"
                )
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed {self.seed}: must lie in [0, 2**32) (numpy RandomState)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers {self.num_workers}: must be >= 0")
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise ValueError(f"data.tokenizer: {self.tokenizer} does not exist")
