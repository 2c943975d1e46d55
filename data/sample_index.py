"""The GPT-NeoX sample order: doc_idx, sample_idx and shuffle_idx, plus the blending schedule.

Samples are ``seq_len + 1`` tokens cut from the concatenation of the documents in ``doc_idx`` order;
sample i covers stream positions ``[i * seq_len, (i + 1) * seq_len]``, so consecutive samples share one
boundary token and every sample adds ``seq_len`` new tokens. GPT-NeoX walks the documents sample by
sample in C++; here the same ``(doc_idx position, offset)`` pairs come from a cumulative sum and a
``searchsorted`` over chunks of documents, so memory stays bounded and no Python loop runs per sample.
"""

from __future__ import annotations

import math

import numpy as np

# Bump when any array below would come out different; it is part of every cache key and fingerprint.
INDEX_VERSION = 1

# Documents per chunk of the sample_idx build and samples per chunk of the blend schedule:
# bounds the temporary arrays (about 40 bytes per document or sample) whatever the data size.
_DOC_CHUNK = 1 << 22
_BLEND_CHUNK = 1 << 20


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Smallest e with ``(e * tokens_per_epoch - 1) // seq_len >= num_samples`` (GPT-NeoX's rule)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the documents hold no tokens")
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """``documents`` repeated per epoch and shuffled as one array, so epochs mix (as GPT-NeoX does)."""
    dtype = np.int32 if len(documents) == 0 or documents.max() < 2**31 else np.int64
    doc_idx = np.tile(np.asarray(documents, dtype=dtype), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """``[num_samples + 1, 2]`` array of (position in doc_idx, token offset) where each sample starts.

    Row i + 1 is also where sample i ends (inclusive): the shared boundary token.
    """
    # Column 0 indexes doc_idx and column 1 is an offset inside one int32-sized document.
    dtype = np.int32 if len(doc_idx) < 2**31 else np.int64
    sample_idx = np.empty((num_samples + 1, 2), dtype=dtype)
    # GPT-NeoX's walk starts at (0, 0) even when the first document is empty.
    sample_idx[0] = 0
    next_sample = 1
    first_token = 0  # stream position of the current chunk's first token
    for lo in range(0, len(doc_idx), _DOC_CHUNK):
        if next_sample > num_samples:
            break
        lengths = sizes[doc_idx[lo : lo + _DOC_CHUNK]].astype(np.int64)
        ends = first_token + np.cumsum(lengths)  # exclusive end of each document in the stream
        last_sample = min(num_samples, (int(ends[-1]) - 1) // seq_len)
        starts = np.arange(next_sample, last_sample + 1, dtype=np.int64) * seq_len
        # The document holding position p is the first whose end exceeds p; empty documents
        # (end == previous end) are passed over just as the walk passes over them.
        doc = np.searchsorted(ends, starts, side="right")
        sample_idx[next_sample : last_sample + 1, 0] = lo + doc
        sample_idx[next_sample : last_sample + 1, 1] = starts - (ends[doc] - lengths[doc])
        next_sample = last_sample + 1
        first_token = int(ends[-1])
    if next_sample != num_samples + 1:
        raise ValueError(f"documents hold too few tokens for {num_samples} samples of {seq_len + 1} tokens")
    return sample_idx


def build_shuffle_idx(num_samples: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max else np.int64
    shuffle_idx = np.arange(num_samples, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def build_index(sizes: np.ndarray, documents: range, seq_len: int, num_samples: int, seed: int) -> dict:
    """GPT-NeoX's three arrays for ``num_samples`` samples (more, up to whole epochs) of ``documents``.

    One ``RandomState(seed)`` shuffles doc_idx and then shuffle_idx, in that order, as GPT-NeoX does.
    """
    tokens_per_epoch = int(sizes[documents.start : documents.stop].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(np.arange(documents.start, documents.stop), num_epochs, rng)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    return {
        "doc_idx": doc_idx,
        "sample_idx": build_sample_idx(sizes, doc_idx, seq_len, total_samples),
        "shuffle_idx": build_shuffle_idx(total_samples, rng),
    }


def build_blend_schedule(weights: list[float], num_samples: int) -> dict:
    """Which dataset (``dataset_index``) and which of its samples (``dataset_sample_index``) fill each slot.

    Sample k of dataset d is due at time ``(k + 0.5) / w_d`` (w normalised); slots are filled in time
    order, ties to the lower d. No randomness, and every prefix of the schedule holds each of the D
    datasets within (D + 1) / 2 samples of its share: at time t each count is within 1/2 of t * w_d,
    so the prefix length is within D / 2 of t. Built in time windows of about ``_BLEND_CHUNK`` slots.
    """
    if not 0 < len(weights) < 2**16:
        raise ValueError(f"blending needs 1 to 65535 datasets, got {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    dataset_index = np.empty(num_samples, dtype=np.uint16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    taken = np.zeros(len(w), dtype=np.int64)
    filled = 0
    window_end = 0.0
    while filled < num_samples:
        window_end += _BLEND_CHUNK
        ks, times = [], []
        for d, w_d in enumerate(w):
            # A window of length T holds at most ceil(T * w_d) + 1 of dataset d's due times.
            k = taken[d] + np.arange(math.ceil(_BLEND_CHUNK * w_d) + 2, dtype=np.int64)
            t = (k + 0.5) / w_d
            assert t[-1] >= window_end
            count = int(np.searchsorted(t, window_end, side="left"))
            ks.append(k[:count])
            times.append(t[:count])
        order = np.argsort(np.concatenate(times), kind="stable")[: num_samples - filled]
        which = np.repeat(np.arange(len(w), dtype=np.uint16), [len(k) for k in ks])
        dataset_index[filled : filled + len(order)] = which[order]
        dataset_sample_index[filled : filled + len(order)] = np.concatenate(ks)[order]
        taken += [len(k) for k in ks]
        filled += len(order)
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}
