"""Data subsystem benchmark; prints a Markdown table for BENCHMARKS.md.

    PYTHONPATH=. python benchmarks/bench_data.py [--workdir DIR] [--tokenizer PATH] [--docs 2000000]

(``PYTHONPATH=.`` is not needed once the project is installed with ``pip install -e .``.)

1. Preprocessing throughput with 1 and 2 workers on the built-in corpus (the Python standard library's
   source), tokenized with ``--tokenizer`` or a 50k byte-level BPE trained on the corpus first.
2. A synthetic 1B-token document-length table (2M documents of ~500 tokens): GPT-NeoX index build time
   and peak RSS in a fresh process (seq_len 2048, one epoch), the sample walk vectorised and in pure
   Python, then the same table as a shard (real ``.idx``, sparse ``.bin``): open time, cache write
   and memory-mapped reload.
3. The blend schedule for 10M samples over 3 datasets.
4. Sample fetch rate (seq_len 2048) from the corpus shard, directly and through the DataLoader.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from data.builtin_corpus import build_builtin_corpus
from data.dataset import GPTDataset
from data.indexed import MMapIndexedDataset, write_index
from data.preprocess import preprocess
from data.sample_index import build_blend_schedule, build_index, build_sample_idx
from data.sampler import PretrainingSampler
from data.train_tokenizer import train_tokenizer

SEQ_LEN = 2048


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc: ru_maxrss would carry the
    parent's peak over into a spawned child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def reference_walk(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> None:
    """GPT-NeoX's per-sample walk in Python, the thing the vectorised build replaces."""
    d = offset = 0
    for _ in range(num_samples):
        remaining = seq_len + 1
        while remaining:
            doc_len = int(sizes[doc_idx[d]]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - 1
                remaining = 0
            else:
                d += 1
                offset = 0


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the preprocessing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_preprocess(workdir: Path, tokenizer: str | None, repeats: int) -> tuple[list[tuple[str, str]], str]:
    corpus = workdir / "stdlib.jsonl"
    documents = build_builtin_corpus(str(corpus))
    if tokenizer is None:
        tokenizer = str(train_tokenizer([str(corpus)], "bpe", 50_000, str(workdir / "bpe50k")))
    rows = [
        ("corpus", f"{documents} documents, {corpus.stat().st_size / 1e6:.1f} MB of jsonl"),
        ("machine", f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before preprocessing"),
    ]
    # Best of alternating runs: on a shared machine the slowest runs measure the neighbours. CPU time
    # per token shows the cost of parallelism whether or not free cores were there to use.
    wall = {1: 0.0, 2: 0.0}
    per_cpu = {1: 0.0, 2: 0.0}
    for _ in range(repeats):
        for workers in wall:
            cpu_before = _cpu_seconds()
            stats = preprocess(
                [str(corpus)], tokenizer, str(workdir / f"corpus{workers}"), workers, progress=False
            )
            wall[workers] = max(wall[workers], stats.tokens_per_second)
            per_cpu[workers] = max(per_cpu[workers], stats.tokens / (_cpu_seconds() - cpu_before))
    for workers in wall:
        rows.append(
            (
                f"preprocess, {workers} worker(s), best of {repeats}",
                f"{wall[workers] / 1e6:.2f} M tokens/s wall, {per_cpu[workers] / 1e6:.2f} M tokens/CPU-s",
            )
        )
    rows.append(
        (
            "preprocess, 2 vs 1 workers",
            f"{wall[2] / wall[1]:.2f}x wall-clock, {per_cpu[2] / per_cpu[1]:.2f}x CPU efficiency "
            f"(load average {os.getloadavg()[0]:.1f} after)",
        )
    )
    return rows, str(workdir / "corpus1")


def _index_child(workdir: str, num_docs: int, queue) -> None:
    sizes = (np.random.default_rng(0).exponential(499.5, num_docs) + 1).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // SEQ_LEN  # one epoch

    _reset_peak_rss()
    rss_before = _rss_mib("VmRSS")
    index, build_s = _timed(lambda: build_index(sizes, range(num_docs), SEQ_LEN, num_samples, 1234))
    rss_peak = _rss_mib("VmHWM")
    index_mib = sum(a.nbytes for a in index.values()) / 2**20
    _, vector_s = _timed(lambda: build_sample_idx(sizes, index["doc_idx"], SEQ_LEN, num_samples))
    walk_samples = min(num_samples, 50_000)
    _, walk_s = _timed(lambda: reference_walk(sizes, index["doc_idx"], SEQ_LEN, walk_samples))

    prefix = os.path.join(workdir, "synthetic")
    write_index(prefix + ".idx", np.uint16, sizes, np.arange(num_docs + 1))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens * 2)  # sparse: opening and indexing never read the tokens
    shard, open_s = _timed(lambda: MMapIndexedDataset(prefix))
    _, first_s = _timed(lambda: GPTDataset(shard, range(num_docs), num_samples, SEQ_LEN, 1234))
    _, cached_s = _timed(lambda: GPTDataset(shard, range(num_docs), num_samples, SEQ_LEN, 1234))
    queue.put(
        [
            (
                "synthetic table",
                f"{num_docs:,} documents, {tokens / 1e9:.2f}B tokens, {num_samples:,} samples",
            ),
            (
                "build doc/sample/shuffle index (seq_len 2048)",
                f"{build_s:.2f} s; peak RSS {rss_peak:.0f} MiB = {rss_before:.0f} before + "
                f"{rss_peak - rss_before:.0f} (the arrays built: {index_mib:.0f} MiB)",
            ),
            (
                "sample_idx: vectorised vs GPT-NeoX walk in Python",
                f"{num_samples / vector_s:,.0f} vs {walk_samples / walk_s:,.0f} samples/s",
            ),
            ("open the 1B-token shard (validates the .idx)", f"{open_s * 1e3:.0f} ms"),
            ("GPTDataset, build + write cache", f"{first_s:.2f} s"),
            ("GPTDataset, load cache (mmap)", f"{cached_s * 1e3:.0f} ms"),
        ]
    )


def bench_index(workdir: Path, num_docs: int) -> list[tuple[str, str]]:
    # A fresh process, so its peak RSS is the index build's and not the preprocessing's.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_index_child, args=(str(workdir), num_docs, queue))
    child.start()
    rows = queue.get()
    child.join()
    return rows


def bench_blend() -> list[tuple[str, str]]:
    _, seconds = _timed(lambda: build_blend_schedule([0.6, 0.3, 0.1], 10_000_000))
    return [("blend schedule, 10M samples, 3 datasets", f"{seconds:.2f} s")]


def bench_fetch(prefix: str) -> list[tuple[str, str]]:
    # Imported here, not at the top: spawned preprocessing workers re-import this script, and torch
    # would add seconds to each one's start-up.
    from data.loader import build_dataloader

    shard = MMapIndexedDataset(prefix)
    ds = GPTDataset(shard, range(len(shard)), 4096, SEQ_LEN, 1234)
    order = np.random.default_rng(0).permutation(len(ds))[:2000]
    _, direct_s = _timed(lambda: [ds[int(i)] for i in order])
    rows = [("fetch samples, dataset[i] (seq_len 2048)", f"{len(order) / direct_s:,.0f} samples/s")]
    for workers in (0, 2):
        batches = iter(build_dataloader(ds, PretrainingSampler(4096, 0, 8, 0, 1, ds.fingerprint), workers))
        next(batches)  # worker start-up is not part of the steady rate
        samples, loader_s = _timed(lambda batches=batches: sum(len(b) for b in batches))
        rows.append((f"DataLoader, micro-batch 8, {workers} workers", f"{samples / loader_s:,.0f} samples/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--tokenizer", help="tokenizer to preprocess with (default: train a 50k BPE)")
    parser.add_argument("--docs", type=int, default=2_000_000, help="documents in the synthetic shard")
    parser.add_argument("--repeats", type=int, default=3, help="preprocessing runs per worker count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows, corpus_prefix = bench_preprocess(workdir, args.tokenizer, args.repeats)
        rows += bench_index(workdir, args.docs)
        rows += bench_blend()
        rows += bench_fetch(corpus_prefix)
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
