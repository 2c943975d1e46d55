"""Training samples over shards: per-prefix GPT-NeoX datasets, blends, splits, and the index cache."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.indexed import MMapIndexedDataset, data_path, index_path
from data.sample_index import INDEX_VERSION, build_blend_schedule, build_index, num_epochs_needed

SPLITS = ("train", "valid", "test")
# The fingerprint hashes this much of each end of a .idx: the head holds the header and first sizes,
# the tail the last pointers, which are the running sum of every size before them.
_IDENTITY_BYTES = 1 << 20


def shard_identity(prefix: str) -> dict:
    """Cheap content identity of a shard: file sizes plus a hash of both ends of the ``.idx``.

    Survives copying the data elsewhere (no paths or mtimes); changing any document length changes it.
    """
    idx = index_path(prefix)
    idx_bytes = os.path.getsize(idx)
    digest = hashlib.blake2b(digest_size=16)
    with open(idx, "rb") as f:
        digest.update(f.read(_IDENTITY_BYTES))
        f.seek(max(0, idx_bytes - _IDENTITY_BYTES))
        digest.update(f.read(_IDENTITY_BYTES))
    return {
        "bin_bytes": os.path.getsize(data_path(prefix)),
        "idx_bytes": idx_bytes,
        "idx_hash": digest.hexdigest(),
    }


def _hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class _CachedArrays:
    """Memory-mapped ``.npy`` files. Pickles as their paths: a pickled np.memmap would copy its data
    into every DataLoader worker started by spawn or forkserver."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths
        self.arrays = {}
        for name, path in paths.items():
            try:  # allow_pickle stays off: an index cache holds plain arrays only
                self.arrays[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"index cache {path}: unreadable ({e})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])


def _initialized_dist():
    # torch.distributed cannot hold a process group unless something imported it already, and not
    # importing it here keeps torch out of the preprocessing workers.
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _save_atomically(path: Path, write: Callable) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_or_build(
    cache_dir: Path, stem: str, build: Callable[[], dict[str, np.ndarray]], description: dict
) -> _CachedArrays:
    """Load ``cache_dir/stem_*.npy`` memory-mapped, building them first if absent.

    Under torch.distributed rank 0 builds while the others wait at a barrier; then, for caches on
    node-local disks, local rank 0 of any node that still sees no cache builds its own. Each file is
    renamed into place whole and the ``stem.json`` description, written last, marks the set complete,
    so a crash never leaves a cache that loads.
    """
    marker = cache_dir / f"{stem}.json"

    def write() -> None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            arrays = build()
            for name, array in arrays.items():
                _save_atomically(cache_dir / f"{stem}_{name}.npy", lambda f, a=array: np.save(f, a))
            listed = {**description, "arrays": sorted(arrays)}
            _save_atomically(marker, lambda f: f.write(json.dumps(listed, indent=1, sort_keys=True).encode()))
        except OSError as e:
            raise ValueError(f"index cache {cache_dir}: cannot write ({e}); set data.cache_dir") from e

    dist = _initialized_dist()
    if dist is None:
        if not marker.is_file():
            write()
    else:
        if dist.get_rank() == 0 and not marker.is_file():
            write()
        dist.barrier()
        if not marker.is_file() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            write()
        dist.barrier()
    try:
        names = json.loads(marker.read_text())["arrays"]
        return _CachedArrays({name: cache_dir / f"{stem}_{name}.npy" for name in names})
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Derived data, but shared by every rank and node: rebuilding it here could race a reader.
        problem = str(e) if str(e).startswith("index cache") else f"index cache {marker}: unreadable ({e})"
        raise ValueError(
            f"{problem}; delete {cache_dir / stem}.json and {cache_dir / stem}_*.npy to rebuild it"
        ) from None


def _default_cache_dir(prefix: str, cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(prefix).resolve().parent / "index-cache"


class GPTDataset:
    """``seq_len + 1``-token samples of one shard's document range, in GPT-NeoX's shuffled order.

    Documents are the shard's items, as in GPT-NeoX (the preprocessor writes one item per document).
    ``len()`` is a whole number of epochs' worth of samples, at least ``num_samples``; an index past
    the end raises IndexError (GPT-NeoX wraps around; this never does).
    """

    def __init__(
        self,
        shard: MMapIndexedDataset,
        documents: range,
        num_samples: int,
        seq_len: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        if not 0 <= documents.start < documents.stop <= len(shard):
            raise ValueError(f"{shard.prefix}: document range {documents} outside [0, {len(shard)})")
        if seq_len < 1 or num_samples < 0:
            raise ValueError(f"seq_len ({seq_len}) must be >= 1 and num_samples ({num_samples}) >= 0")
        self.shard = shard
        self.seq_len = seq_len
        description = {
            "kind": "gpt",
            "version": INDEX_VERSION,
            "shard": shard_identity(shard.prefix),
            "documents": [documents.start, documents.stop],
            "num_samples": num_samples,
            "seq_len": seq_len,
            "seed": seed,
        }
        self.fingerprint = _hash(description)
        # The arrays depend on num_samples only through the number of epochs: more samples within
        # the same epochs leave the order of every sample as it was.
        tokens = int(shard.sizes[documents.start : documents.stop].sum(dtype=np.int64))
        epochs = num_epochs_needed(tokens, seq_len, num_samples) if tokens else 0
        self.order_fingerprint = _hash({**description, "num_samples": None, "num_epochs": epochs})
        self.index = load_or_build(
            _default_cache_dir(shard.prefix, cache_dir),
            f"{Path(shard.prefix).name}_{self.fingerprint[:20]}",
            lambda: build_index(shard.sizes, documents, seq_len, num_samples, seed),
            {**description, "prefix": shard.prefix},
        )

    def __len__(self) -> int:
        return len(self.index["shuffle_idx"])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} past the end of {self.shard.prefix} ({len(self)} samples)")
        doc_idx, sample_idx = self.index["doc_idx"], self.index["sample_idx"]
        j = int(self.index["shuffle_idx"][i])
        (first, first_offset), (last, last_offset) = sample_idx[j].tolist(), sample_idx[j + 1].tolist()
        get = self.shard.get
        if first == last:
            parts = [get(int(doc_idx[first]), first_offset, last_offset - first_offset + 1)]
        else:
            parts = [get(int(doc_idx[first]), first_offset)]
            parts += [get(int(doc_idx[d])) for d in range(first + 1, last)]
            parts.append(get(int(doc_idx[last]), 0, last_offset + 1))
        sample = np.concatenate(parts).astype(np.int64)
        assert len(sample) == self.seq_len + 1
        return sample


class PreshuffledDataset:
    """Shard items that already are samples (``seq_len + 1`` tokens each), in file order.

    Pythia's pre-shuffled Pile shards hold one 2049-token sample per item in the order Pythia trained
    on. Epochs repeat that order; ``len()`` is a whole number of epochs, at least ``num_samples``.
    """

    def __init__(self, shard: MMapIndexedDataset, documents: range, num_samples: int, seq_len: int):
        sizes = np.asarray(shard.sizes[documents.start : documents.stop])
        wrong = np.flatnonzero(sizes != seq_len + 1)
        if len(wrong):
            item = documents.start + int(wrong[0])
            raise ValueError(
                f"{shard.prefix}: data.sample_order 'preshuffled' needs every item to be seq_len + 1 = "
                f"{seq_len + 1} tokens; item {item} has {int(sizes[wrong[0]])} ({len(wrong)} items differ)"
            )
        self.shard, self.documents, self.seq_len = shard, documents, seq_len
        self.num_epochs = max(1, -(-num_samples // len(documents)))
        self.fingerprint = _hash(
            {
                "kind": "preshuffled",
                "shard": shard_identity(shard.prefix),
                "documents": [documents.start, documents.stop],
                "num_samples": num_samples,
                "seq_len": seq_len,
            }
        )
        # File order, epoch after epoch: more samples never change the order of earlier ones.
        self.order_fingerprint = _hash(
            {
                "kind": "preshuffled",
                "shard": shard_identity(shard.prefix),
                "documents": [documents.start, documents.stop],
                "seq_len": seq_len,
            }
        )

    def __len__(self) -> int:
        return self.num_epochs * len(self.documents)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} past the end of {self.shard.prefix} ({len(self)} samples)")
        return self.shard.get(self.documents[i % len(self.documents)]).astype(np.int64)


def _sample_dataset(
    cfg: DataConfig, shard: MMapIndexedDataset, documents: range, num_samples: int, seq_len: int
) -> GPTDataset | PreshuffledDataset:
    if cfg.sample_order == "preshuffled":
        return PreshuffledDataset(shard, documents, num_samples, seq_len)
    return GPTDataset(shard, documents, num_samples, seq_len, cfg.seed, cfg.cache_dir)


class BlendedDataset:
    """Several datasets interleaved by weight on a fixed schedule (``build_blend_schedule``)."""

    def __init__(
        self,
        datasets: list[GPTDataset | PreshuffledDataset],
        weights: list[float],
        schedule: _CachedArrays,
        fingerprint: str,
        order_fingerprint: str,
    ):
        self.datasets = datasets
        self.weights = weights
        self.schedule = schedule
        self.fingerprint = fingerprint
        self.order_fingerprint = order_fingerprint  # the sample order, whatever the sample count

    def __len__(self) -> int:
        return len(self.schedule["dataset_index"])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} past the end of the blend ({len(self)} samples)")
        d = int(self.schedule["dataset_index"][i])
        return self.datasets[d][int(self.schedule["dataset_sample_index"][i])]


SampleDataset = GPTDataset | PreshuffledDataset | BlendedDataset


def split_range(num_documents: int, fractions: list[float], which: int) -> range:
    """Contiguous document range ``which`` (0 train, 1 valid, 2 test) of a shard split by ``fractions``."""
    # Rounding the cumulative boundaries keeps the ranges adjacent and the last one ending at N.
    bounds = np.round(np.cumsum([0.0, *fractions]) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return range(int(bounds[which]), int(bounds[which + 1]))


def _sources(cfg: DataConfig, split: str) -> tuple[list[str], list[float] | None, int | None]:
    """Prefixes, weights and split position (None = whole shard) feeding ``split``."""
    own_paths = {"valid": cfg.valid_paths, "test": cfg.test_paths}.get(split)
    if own_paths:
        return own_paths, None, None
    use_split = not (cfg.valid_paths and cfg.test_paths)
    return cfg.train_paths, cfg.train_weights, SPLITS.index(split) if use_split else None


def _build_split(
    cfg: DataConfig, split: str, shards: dict[str, MMapIndexedDataset], seq_len: int, num_samples: int
) -> SampleDataset | None:
    prefixes, weights, position = _sources(cfg, split)
    parts = []  # (shard, documents, weight)
    for i, prefix in enumerate(prefixes):
        shard = shards[prefix]
        documents = (
            range(len(shard))
            if position is None
            else split_range(len(shard), cfg.split_fractions(), position)
        )
        tokens = int(shard.sizes[documents.start : documents.stop].sum(dtype=np.int64))
        if tokens:
            parts.append((shard, documents, weights[i] if weights else tokens))
    if not parts:
        return None
    if len(parts) == 1:
        shard, documents, _ = parts[0]
        return _sample_dataset(cfg, shard, documents, num_samples, seq_len)

    part_weights = [float(w) for _, _, w in parts]
    total = sum(part_weights)
    part_weights = [w / total for w in part_weights]
    description = {
        "kind": "blend",
        "version": INDEX_VERSION,
        "weights": part_weights,
        "num_samples": num_samples,
    }
    schedule = load_or_build(
        _default_cache_dir(prefixes[0], cfg.cache_dir),
        f"blend_{_hash(description)[:20]}",
        lambda: build_blend_schedule(part_weights, num_samples),
        description,
    )
    counts = np.bincount(schedule["dataset_index"], minlength=len(parts))
    datasets = [
        _sample_dataset(cfg, shard, documents, max(1, int(count)), seq_len)
        for (shard, documents, _), count in zip(parts, counts)
    ]
    fingerprint = _hash({**description, "datasets": [d.fingerprint for d in datasets]})
    # Every prefix of the schedule is the schedule of fewer samples: the order is the parts' orders.
    order = _hash({**description, "num_samples": None, "datasets": [d.order_fingerprint for d in datasets]})
    return BlendedDataset(datasets, part_weights, schedule, fingerprint, order)


def check_token_ids(shard: MMapIndexedDataset, vocab_size: int, cache_dir: str | None = None) -> None:
    """Raise ValueError naming the shard, document and position of the first token id outside
    [0, vocab_size). The shard's id range is read once (a full pass over the ``.bin``) and kept in the
    index cache under the shard's content identity, so later launches read a few bytes."""
    description = {"kind": "token-range", "version": 1, "shard": shard_identity(shard.prefix)}
    cached = load_or_build(
        _default_cache_dir(shard.prefix, cache_dir),
        f"{Path(shard.prefix).name}_tokens_{_hash(description)[:20]}",
        lambda: {"range": np.array(shard.token_id_range(), dtype=np.int64)},
        {**description, "prefix": shard.prefix},
    )
    low, high = (int(v) for v in cached["range"])
    if high < 0 or (low >= 0 and high < vocab_size):
        return
    found = shard.first_token_outside(vocab_size)
    if found is None:  # the cache describes other content than the shard now holds
        raise ValueError(f"{data_path(shard.prefix)}: the index cache's token-id range does not match it")
    item, position, token = found
    raise ValueError(
        f"{data_path(shard.prefix)}: token id {token} at position {position} of document {item} is outside "
        f"the model's vocabulary [0, {vocab_size}) (ids seen in the shard: {low}..{high}); tokenize it with "
        "the model's tokenizer or set model.overrides.vocab_size"
    )


def build_datasets(
    cfg: DataConfig, seq_len: int, num_samples: dict[str, int], vocab_size: int | None = None
) -> dict[str, SampleDataset | None]:
    """Train/valid/test datasets of ``seq_len + 1``-token int64 samples; None for an empty split.

    ``num_samples[split]`` is how many samples the run will draw; each dataset holds at least that many
    (whole epochs). A split asked for 0 samples, or whose documents are empty, is None. With
    `vocab_size`, every shard used is checked to hold only ids below it (`check_token_ids`).
    """
    cfg.validate()
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if num_samples.get("train", 0) > 0 and not cfg.train_paths:
        raise ValueError("data.train_paths is empty but train samples were requested")
    unknown = set(num_samples) - set(SPLITS)
    if unknown:
        raise ValueError(f"num_samples has unknown splits {sorted(unknown)}; expected {SPLITS}")
    wanted = [s for s in SPLITS if num_samples.get(s, 0) > 0]
    prefixes = {p for s in wanted for p in _sources(cfg, s)[0]}
    shards = {p: MMapIndexedDataset(p) for p in sorted(prefixes)}
    if vocab_size is not None:
        for shard in shards.values():
            check_token_ids(shard, vocab_size, cfg.cache_dir)
    return {s: _build_split(cfg, s, shards, seq_len, num_samples[s]) if s in wanted else None for s in SPLITS}
