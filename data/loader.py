"""DataLoader over a sample dataset driven by ``PretrainingSampler``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.dataset import SampleDataset
from data.sampler import PretrainingSampler


def _stack(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples))


def build_dataloader(dataset: SampleDataset, sampler: PretrainingSampler, num_workers: int = 1) -> DataLoader:
    """Batches of ``torch.LongTensor[micro_batch, seq_len + 1]``, in the sampler's order.

    Batches come back in order even with several workers, so the sample stream is the same for any
    ``num_workers``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_stack,
        pin_memory=torch.cuda.is_available(),
    )
