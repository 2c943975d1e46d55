"""Tokenized shards, sample indexes, blending and the resumable sampler.

Imports stay free of torch so the preprocessing workers start fast; ``data.loader`` brings torch in.
"""

from data.config import DataConfig
from data.dataset import BlendedDataset, GPTDataset, PreshuffledDataset, SampleDataset, build_datasets

__all__ = [
    "BlendedDataset",
    "DataConfig",
    "GPTDataset",
    "PreshuffledDataset",
    "SampleDataset",
    "build_datasets",
]
