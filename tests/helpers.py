"""Helpers shared by the tests: tiny models and batches, a tiny tokenizer, and the training runs'
configs and launch commands (real DeepSpeed on 2 CPU ranks). The one module tests import from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model import AdaPonderConfig, AdaPonderForCausalLM
from training.distributed import free_port

# --- tiny models (fp32, CPU, a few thousand parameters) ------------------------------------------

VOCAB = 96


def tiny(**overrides) -> AdaPonderConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        gate_intermediate_size=16,
        max_position_embeddings=64,
    )
    return AdaPonderConfig(**{**fields, **overrides})


def random_halting_model(seed: int = 0, **overrides) -> AdaPonderForCausalLM:
    """Gates with random weights around tau = 0.5, so tokens exit after every possible pass,
    differently per sequence and position. In training mode, as constructed."""
    torch.manual_seed(seed)
    model = AdaPonderForCausalLM(tiny(halt_threshold=0.5, **overrides))
    with torch.no_grad():
        for gate in model.ponder_gates:
            gate.dense_out.weight.normal_(0.0, 2.0)
            gate.dense_out.bias.fill_(0.8)
    return model


def left_padded_batch(lengths, total, seed=0):
    """ids, attention_mask and transformers-style position ids of sequences left-padded to `total`."""
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
    ids = ids * mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def save_tiny_tokenizer(path):
    """Word-level tokenizer over a few words; id 0 is the end of text."""
    words = ["<|endoftext|>"] + [f"w{i}" for i in range(VOCAB - 1)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)


# --- training runs: real DeepSpeed ZeRO-3 on 2 CPU ranks -------------------------------------------

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "training" / "pretrain.py"
STEPS = 8
GLOBAL_BATCH = 8


def make_config(tmp_path: Path, train_shards, name: str, **changes) -> Path:
    prefix, tokenizer = train_shards
    tree = {
        "run_dir": str(tmp_path / name),
        "model": {"preset": "tiny"},
        "data": {"train_paths": [prefix], "tokenizer": tokenizer, "split": "95,5,0", "num_workers": 1},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup": 2},
        "ponder": {"start": 4, "ramp": 4},  # the ponder loss comes on halfway
        "checkpoint": {"interval": 4, "keep_last": 2},
        "logging": {"log_interval": 1, "eval_interval": 4, "eval_samples": 8, "peak_tflops": 0.1},
        "seq_len": 32,
        "micro_batch_size": 4,
        "global_batch_size": GLOBAL_BATCH,
        "train_steps": STEPS,
        "precision": "fp32",
        "deepspeed_config": str(REPO / "ds_configs" / "zero3.json"),
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def command(config: Path, *overrides: str, nproc: int = 2, launcher: str = "torchrun") -> list[str]:
    if nproc == 1:
        return [sys.executable, str(PRETRAIN), "--config", str(config), *overrides]
    if launcher == "deepspeed":
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    else:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*runner, "--master_port", str(free_port()), str(PRETRAIN), "--config", str(config), *overrides]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def train(config: Path, *overrides: str, nproc: int = 2, launcher: str = "torchrun", expect: int = 0):
    result = subprocess.run(
        command(config, *overrides, nproc=nproc, launcher=launcher),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run_dir"])


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())
