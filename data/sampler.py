"""Resumable data-parallel sampler whose position is the number of samples consumed globally."""

from __future__ import annotations

import warnings
from collections.abc import Iterator


class PretrainingSampler:
    """Yields this rank's micro-batch of sample indices for every global step from ``consumed_samples``.

    The global order is ``start_sample``, ``start_sample + 1``, ... (0 for most runs; a run continued
    from Pythia's step N starts at N x 1024 in its pre-shuffled data); each step takes the next
    ``micro_batch_size * data_parallel_size`` indices and rank r gets positions
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of them.
    Because the position is a sample count rather than a step, a run may resume with another number of
    ranks or another micro-batch and still see exactly the samples an uninterrupted run would.
    ``consumed_samples`` counts this run's samples from its start; ``num_samples`` is how many the run
    draws, so the dataset must hold ``start_sample + num_samples``. Iteration stops before a global
    step that would run past ``num_samples``; it never wraps.
    """

    def __init__(
        self,
        num_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        fingerprint: str,
        start_sample: int = 0,
        order_fingerprint: str | None = None,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size ({data_parallel_size}) "
                "must be at least 1"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        if start_sample < 0:
            raise ValueError(f"start_sample {start_sample} must be >= 0")
        self.start_sample = start_sample
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.fingerprint = fingerprint
        self.order_fingerprint = order_fingerprint  # the order alone (the data minus its sample count)
        self._set_consumed(consumed_samples)

    def _set_consumed(self, consumed_samples: int) -> None:
        if not 0 <= consumed_samples <= self.num_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside the dataset's {self.num_samples} samples; "
                "the run has used up its data (raise the number of samples it is built for)"
            )
        self.consumed_samples = consumed_samples

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Steps left from ``consumed_samples``."""
        return (self.num_samples - self.consumed_samples) // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.start_sample + self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.global_batch_size
            yield list(range(start, start + self.micro_batch_size))

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        """Position to checkpoint. Pass the samples the trainer has consumed: DataLoader prefetching
        runs the iterator ahead, so the sampler cannot know. None saves the starting position."""
        return {
            "consumed_samples": self.consumed_samples if consumed_samples is None else consumed_samples,
            "fingerprint": self.fingerprint,
            "order_fingerprint": self.order_fingerprint,
            "start_sample": self.start_sample,
        }

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Resume from ``state``; ValueError if it was saved for other data, unless ``allow_data_change``."""
        missing = {"consumed_samples", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}")
        # Checkpoints from before start_sample existed started at 0.
        saved_start = int(state.get("start_sample", 0))
        if saved_start != self.start_sample:
            raise ValueError(
                f"the checkpoint's run started at sample {saved_start} but data.start_sample / "
                f"data.start_after_pythia_step now give {self.start_sample}; the start of a run cannot "
                "change when it resumes (use a new run_dir to start elsewhere)"
            )
        if state["fingerprint"] != self.fingerprint:
            # Only the sample count moved, within the epochs the index already holds: same order.
            saved_order = state.get("order_fingerprint")
            if self.order_fingerprint is None or saved_order != self.order_fingerprint:
                message = (
                    f"dataset fingerprint {self.fingerprint[:12]}... differs from the checkpoint's "
                    f"{str(state['fingerprint'])[:12]}...: the data, seq_len, seed, split, weights or "
                    "the epochs the run needs (train_steps past an epoch) changed since it was saved"
                )
                if not allow_data_change:
                    raise ValueError(message + " (set data.allow_data_change to resume anyway)")
                warnings.warn(
                    message + "; continuing at the saved sample count as allowed: the samples are now drawn "
                    "from a reshuffled index, so the run does not see the samples the original run would "
                    "have seen next (some repeat, some are skipped)",
                    stacklevel=2,
                )
        self._set_consumed(int(state["consumed_samples"]))
