"""Peak memory of tokenizing one huge document: in one `encode()` call vs in pieces (data/preprocess.py).

    PYTHONPATH=. python benchmarks/bench_huge_document.py [--mib 16] [--tokenizer PATH]

The document is the built-in corpus (the Python standard library's sources) repeated to `--mib` MiB
of text; the tokenizer is `--tokenizer` or an 8k byte-level BPE trained on the corpus first. Each
way runs in a fresh process; the peak is the growth of the resident set (ru_maxrss) over what the
process held with the text loaded. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from data.builtin_corpus import build_builtin_corpus
from data.preprocess import _Encoder
from data.train_tokenizer import train_tokenizer


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(way: str, corpus: str, tokenizer: str, mib: int, out: multiprocessing.Queue) -> None:
    texts = [json.loads(line)["text"] for line in Path(corpus).read_text().splitlines()]
    base = "".join(texts)
    text = (base * (mib * 2**20 // len(base) + 1))[: mib * 2**20]
    encoder = _Encoder(tokenizer, 0, "int32")
    before = _current_rss_mib()
    started = time.perf_counter()
    if way == "one encode() call":  # what preprocess did before
        ids = np.array(encoder.tokenizer.encode(text) + [0], dtype=np.int32)
    else:
        ids = encoder.encode_document(text)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    digest = hashlib.sha256(ids.tobytes()).hexdigest()
    out.put((way, len(text), len(ids), peak - before, seconds, digest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=16, help="size of the document in MiB of text")
    parser.add_argument("--tokenizer", help="tokenizer (default: an 8k BPE trained on the corpus)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = str(Path(tmp) / "corpus.jsonl")
        build_builtin_corpus(corpus, max_bytes=4_000_000)
        tokenizer = args.tokenizer or str(train_tokenizer([corpus], "bpe", 8192, str(Path(tmp) / "bpe")))
        context = multiprocessing.get_context("spawn")
        rows = []
        for way in ("one encode() call", "pieces (encode_document)"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(way, corpus, tokenizer, args.mib, queue))
            process.start()
            rows.append(queue.get())
            process.join()
    whole = rows[0][3]
    print("| way | document | tokens | peak memory growth | x document | vs one call | seconds |")
    print("|---|---|---|---|---|---|---|")
    for way, chars, tokens, peak, seconds, _ in rows:
        print(
            f"| {way} | {chars / 2**20:.0f} MiB | {tokens:,} | {peak:,.0f} MiB | {peak * 2**20 / chars:.1f}x "
            f"| {peak / whole:.3f} | {seconds:.1f} |"
        )
    print(f"same ids: {rows[0][5] == rows[1][5]}")


if __name__ == "__main__":
    main()
