"""Shared test setup: CPU only, fp32, quiet Hugging Face logging."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread per process (tests' subprocesses inherit it): the tests' models are tiny, and
# two OpenMP threads on a 2-core machine that is busy with anything else spin at their barriers:
# tests/test_speculative.py's greedy test took 45 s instead of 0.7 s that way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --- training tests: a small tokenized slice of real text, built once per session ---------------


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """~1 MB of the Python standard library's sources, a 512-token byte-level BPE tokenizer trained on
    it, and its MMIDIDX shards. Returns (shard prefix, tokenizer directory) as strings."""
    from data.builtin_corpus import build_builtin_corpus
    from data.preprocess import preprocess
    from data.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_shards")
    corpus = root / "stdlib.jsonl"
    build_builtin_corpus(str(corpus), max_bytes=1_000_000)
    tokenizer = train_tokenizer([str(corpus)], "bpe", 512, str(root / "tokenizer"))
    prefix = root / "stdlib_text_document"
    preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
    return str(prefix), str(tokenizer)
