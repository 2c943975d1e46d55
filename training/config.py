"""The run configuration: one dataclass per concern, loaded from YAML plus `key.sub=value` overrides.

Load order is dataclass defaults < YAML file < command-line overrides. Unknown keys and values of
the wrong type are `ValueError`s naming the dotted field and the file (or override) they came from.
The config is read-only once loaded; runtime counters live in the trainer's state.

Units: "samples" are sequences of `seq_len` tokens (plus one target); a "step" is one optimizer
step over `global_batch_size` samples. Schedule fields state whether they count steps or tokens.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.config import DataConfig
from model import PRESETS, AdaPonderConfig
from model.config import INIT_SCHEMES

REPO_ROOT = Path(__file__).resolve().parents[1]

ScheduleUnit = Literal["steps", "tokens"]


@dataclass
class ModelConfig:
    """Which model to build: a named preset, or a Hugging Face checkpoint to continue from."""

    preset: str | None = None  # a name in model.PRESETS ("tiny", "pythia-70m", ...); from scratch
    init_from: str | None = None  # Pythia / PonderLM / AdaPonderLM HF directory (continued pretraining)
    overrides: dict[str, Any] = field(default_factory=dict)  # AdaPonderConfig fields set over either
    # How a from-scratch model draws its weights (AdaPonderConfig.init_scheme): "ponderlm", the scheme
    # the paper's baselines were trained with, or "pythia". Continued pretraining loads its weights.
    init: str | None = None  # None: "ponderlm" from a preset

    def validate(self) -> None:
        if (self.preset is None) == (self.init_from is None):
            raise ValueError("exactly one of model.preset and model.init_from must be set")
        if self.init is not None and self.init_from is not None:
            raise ValueError("model.init is for model.preset (from scratch); model.init_from loads weights")
        if self.init is not None and self.init not in INIT_SCHEMES:
            raise ValueError(f"model.init must be one of {list(INIT_SCHEMES)}, got {self.init!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(f"model.init_from: {self.init_from} has no config.json")
        if "init_scheme" in self.overrides:
            raise ValueError("model.overrides.init_scheme: set model.init instead")
        known = set(AdaPonderConfig().to_dict())
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides: unknown AdaPonderConfig fields {unknown}")
        hints = typing.get_type_hints(AdaPonderConfig.__init__)
        for name, value in self.overrides.items():
            if name not in hints:
                continue
            try:
                self.overrides[name] = _coerce(value, hints[name], name, _Sources("", {}))
            except ValueError:
                expected = " or ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(hints[name]))
                raise ValueError(
                    f"model.overrides.{name} must be of type {expected or hints[name].__name__}, "
                    f"got {value!r} ({type(value).__name__})"
                ) from None


@dataclass
class OptimizerConfig:
    """AdamW with Pythia's settings; weight decay only on tensors with ndim >= 2."""

    lr: float = 1e-3  # peak learning rate (Pythia: 1e-3 at 70M ... 1.6e-4 at 2.8B)
    betas: tuple[float, float] = (0.9, 0.95)  # Adam's decay rates of the moments (Pythia: 0.9, 0.95)
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # on matrices and embeddings; never on biases and LayerNorm weights
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # Gates learn at lr x this. Adam moves each of a gate's 4d output weights by ~lr per step, so at
    # the backbone's lr the gate logits swing by tens within a few dozen steps and tokens halt before
    # pondering has had a chance to help (seen in the quickstart: 1.7 passes before any ponder loss).
    gate_lr_multiplier: float = 0.1

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ValueError(f"optimizer.eps must be > 0, got {self.eps}")
        if self.gate_lr_multiplier <= 0:
            raise ValueError(f"optimizer.gate_lr_multiplier must be > 0, got {self.gate_lr_multiplier}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optimizer.weight_decay and optimizer.grad_clip must be >= 0")


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup, then cosine decay to `min_lr_ratio * lr`, then flat."""

    unit: ScheduleUnit = "steps"  # what `warmup` and `decay_end` count: optimizer steps or tokens
    warmup: int = 0  # length of the linear warmup, in `unit`
    decay_end: int | None = None  # where the cosine reaches its minimum, in `unit`; None: end of run
    min_lr_ratio: float = 0.1  # minimum learning rate as a fraction of optimizer.lr (Pythia: 0.1)

    def validate(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"schedule.warmup must be >= 0, got {self.warmup}")
        if self.decay_end is not None and self.decay_end <= self.warmup:
            raise ValueError(f"schedule.decay_end ({self.decay_end}) must exceed warmup ({self.warmup})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class PonderConfig:
    """Ponder-loss schedule (docs/method.md) and the gates-only phase of continued pretraining.

    Stage 1 trains without the ponder loss for `start` units; then the loss weight is
    `loss_weight` and the bottom-k fraction k rises linearly from 0 to `k_max` over `ramp` units.
    """

    unit: ScheduleUnit = "steps"  # what `start`, `ramp`, `gates_only`, `backbone_warmup` count
    loss_weight: float = 0.1  # lambda of the bottom-k gate loss (paper: 0.1)
    k_max: float = 0.1  # final fraction of gate values in the bottom-k mean (paper: 0.1)
    start: int = 0  # S0: length of stage 1 (no ponder loss), in `unit`
    ramp: int = 0  # S1 - S0: length of the linear rise of k to k_max, in `unit`
    # Only the gates learn for this long, in `unit`: the backbone's parameters do not require grad
    # (no weight gradients computed, reduced or clipped; its activations still carry the gates'
    # gradient through later passes) and its learning rate is 0.
    gates_only: int = 0
    # After the gates-only phase the backbone's learning rate rises linearly from 0 to the schedule's
    # over this long, in `unit`, instead of jumping to it with fresh Adam moments. 0: no re-warm.
    backbone_warmup: int = 0
    # Each pass runs only the tokens still active, forward and backward (model/ponder.py, packed): the
    # dense step's numbers and gradients, minus the compute of halted tokens (benchmarks/
    # bench_sparse_train.py: as fast as dense with nobody halted, faster from the paper's rates on).
    sparse_training: bool = True
    # False: while the loss weight is 0 (stage 1) every token runs all passes (mask 1); the gates
    # still scale the updates and learn, but cannot halt a token before the ponder loss starts.
    halt_during_stage1: bool = True

    def validate(self) -> None:
        if self.loss_weight < 0:
            raise ValueError(f"ponder.loss_weight must be >= 0, got {self.loss_weight}")
        if not 0.0 <= self.k_max <= 1.0:
            raise ValueError(f"ponder.k_max must be in [0, 1], got {self.k_max}")
        for name in ("start", "ramp", "gates_only", "backbone_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"ponder.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    """Checkpoints go to `<run_dir>/checkpoints/step-XXXXXXXX/`; a run resumes from `latest`."""

    interval: int = 1000  # optimizer steps between checkpoints; 0: only at the end (and on a signal)
    keep_last: int = 3  # complete checkpoints kept, older ones deleted; 0 keeps all

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    """Console, TensorBoard (`<run_dir>/tensorboard/`, rank 0) and validation cadence."""

    log_interval: int = 10  # optimizer steps between console lines and TensorBoard scalars
    eval_interval: int = 1000  # optimizer steps between validation passes (and one at the end); 0: off
    eval_samples: int = 64  # validation samples per evaluation: always the same first ones
    # Peak dense TFLOP/s of one rank's device for MFU; None: detected (training.metrics), or set it
    # for a device the table does not know.
    peak_tflops: float | None = None
    progress_bar: bool = True  # a tqdm bar on rank 0 when stderr is a terminal
    # Beside TensorBoard, DeepSpeed's own monitors get every scalar (docs/metrics.md):
    csv_monitor: bool = False  # one `<run_dir>/monitor/csv/<tag>.csv` per tag (step, value)
    wandb_project: str | None = None  # Weights & Biases project (needs `pip install wandb`); None: off
    wandb_team: str | None = None  # its entity (team or user); None: the default of your login

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")
        if self.eval_interval < 0 or self.eval_samples < 0:
            raise ValueError("logging.eval_interval and logging.eval_samples must be >= 0")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"logging.peak_tflops must be > 0, got {self.peak_tflops}")
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb_project is set but wandb is not installed (pip install wandb)")


@dataclass
class RunConfig:
    """Everything one training run reads; written resolved to `<run_dir>/config.yaml`."""

    run_dir: str = "runs/default"  # holds config.yaml, checkpoints/ and tensorboard/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ponder: PonderConfig = field(default_factory=PonderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seq_len: int = 2048  # tokens per sample (each sample carries one more token as the last target)
    micro_batch_size: int = 1  # samples per rank per forward/backward
    global_batch_size: int = 1024  # samples per optimizer step over all ranks (Pythia: 1024)
    gradient_accumulation_steps: int | None = None  # None: global / (micro x ranks); else checked
    train_steps: int | None = None  # length of the run in optimizer steps (set this or train_tokens)
    train_tokens: int | None = None  # length of the run in tokens, rounded up to whole steps
    exit_at_step: int | None = None  # checkpoint and stop after this step (job-sized chunks of a run)
    # Parameter/compute dtype; master weights, Adam and gradient accumulation stay fp32. fp16 (GPUs
    # without bf16: V100, T4) scales the loss dynamically.
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    deepspeed_config: str = "ds_configs/zero3.json"  # ZeRO settings; relative to cwd, else the repo
    activation_checkpointing: bool = False  # recompute each layer in backward to save activations
    seed: int = 1234  # model init and any randomness; the data order has its own data.seed

    def validate(self, check_data: bool = True) -> None:
        """Check every field that can be checked without knowing the number of ranks (the data
        files too unless `check_data` is off: a --dry-run plans without them)."""
        for sub in (self.model, self.optimizer, self.schedule, self.ponder, self.checkpoint, self.logging):
            sub.validate()
        if check_data:
            self.data.validate()
        for name in ("seq_len", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        positions = self.model_config().max_position_embeddings
        if self.seq_len > positions:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds the model's max_position_embeddings {positions}: positions "
                "beyond it were never trained (lower seq_len, or set model.overrides.max_position_embeddings)"
            )
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ValueError("exactly one of train_steps and train_tokens must be set")
        if (self.train_steps or 1) < 1 or (self.train_tokens or 1) < 1:
            raise ValueError("train_steps / train_tokens must be >= 1")
        if self.exit_at_step is not None and self.exit_at_step < 1:
            raise ValueError(f"exit_at_step must be >= 1, got {self.exit_at_step}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        resolve_path(self.deepspeed_config, "deepspeed_config")
        if self.ponder.gates_only and not self.model_config().adaptive:
            raise ValueError("ponder.gates_only: the model has no gates (adaptive: false) to train alone")

    def model_config(self) -> AdaPonderConfig:
        """The architecture: the preset, or the checkpoint's config.json, with the overrides."""
        if self.model.init_from is not None:
            from model.hf_compat import config_from_checkpoint

            return config_from_checkpoint(self.model.init_from, **self.model.overrides)
        return AdaPonderConfig.from_preset(
            self.model.preset, init_scheme=self.model.init or "ponderlm", **self.model.overrides
        )


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic, stated once: global = micro x accumulation x data-parallel ranks."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    global_batch_size: int
    seq_len: int
    train_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} samples = micro {self.micro_batch_size} x "
            f"accumulation {self.gradient_accumulation_steps} x {self.data_parallel_size} ranks; "
            f"{self.tokens_per_step:,} tokens/step; {self.train_steps:,} steps = "
            f"{self.train_steps * self.tokens_per_step:,} tokens"
        )


def plan_batches(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Derive gradient accumulation and the run length for `world_size` data-parallel ranks."""
    per_micro_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_micro_step:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size} x {world_size} ranks"
        )
    accumulation = cfg.global_batch_size // per_micro_step
    if cfg.gradient_accumulation_steps not in (None, accumulation):
        raise ValueError(
            f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} contradicts global_batch_size "
            f"{cfg.global_batch_size} / (micro_batch_size {cfg.micro_batch_size} x {world_size} ranks) "
            f"= {accumulation}"
        )
    if cfg.logging.eval_samples % per_micro_step:
        raise ValueError(
            f"logging.eval_samples {cfg.logging.eval_samples} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size} x {world_size} ranks"
        )
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    steps = cfg.train_steps or -(-cfg.train_tokens // tokens_per_step)
    return BatchPlan(
        cfg.micro_batch_size, accumulation, world_size, cfg.global_batch_size, cfg.seq_len, steps
    )


def resolve_path(path: str, name: str) -> Path:
    """A shipped file named relative to the working directory, else to the repository root."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"{name}: file {path} not found (relative to {Path.cwd()} or {REPO_ROOT})")


# --------------------------------------------------------------------------------------------------
# Loading, overriding and dumping.


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, build and validate the tree."""
    cfg = read_config(path, overrides)
    cfg.validate()
    return cfg


def read_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Build the config tree with types checked but without `validate()` (files may not exist yet)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read the run config ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a run config must be a mapping at the top level")
    sources = _Sources(str(path or "defaults"), {})
    for item in overrides:
        sources.overrides[_apply_override(raw, item)] = item
    cfg = _build(RunConfig, raw, "", sources)
    if cfg.data.tokenizer is None and cfg.model.init_from is not None:
        # A Pythia / PonderLM directory carries the tokenizer its shards were made with.
        init_from = Path(cfg.model.init_from)
        if any((init_from / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            cfg.data.tokenizer = str(init_from)
    return cfg


def preset_of_checkpoint_name(init_from: str) -> str | None:
    """The Pythia preset a checkpoint directory's name says it has the shape of (`pythia-1.4b`,
    `PonderingPythia-1.4B`, `pythia-410m-deduped` ...), or None: what a --dry-run plans with when
    the weights are not on the planning machine."""
    match = re.search(r"pythia-?(\d+(?:\.\d+)?[mb])", Path(init_from).name.lower())
    preset = f"pythia-{match.group(1)}" if match else None
    return preset if preset in PRESETS else None


@dataclass(frozen=True)
class _Sources:
    """Where each value came from, so that an error blames the override that set it, not the file."""

    file: str
    overrides: dict[str, str]  # dotted key -> the `key=value` text that set it

    def of(self, name: str) -> str:
        for key, item in self.overrides.items():
            if name == key or name.startswith((key + ".", key + "[")):
                return f"override {item!r}"
        return self.file


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe nested dict (tuples become lists)."""
    return config_to_dict_value(dataclasses.asdict(cfg))


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set the value of `key.sub=value` in the raw tree; returns the dotted key."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    parts = key.split(".")
    _check_override_path(RunConfig, parts, item)
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"override {item!r}: the value {text!r} is not valid YAML ({problem}); quote it to pass a string"
        ) from None
    return key


def _check_override_path(cls: type, parts: list[str], item: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    head, rest = parts[0], parts[1:]
    if head not in hints:
        hint = _suggestion(cls, prefix, head)
        raise ValueError(f"override {item!r}: unknown config key '{prefix}{head}'{hint}")
    inner = _strip_optional(hints[head])
    if rest and dataclasses.is_dataclass(inner):
        _check_override_path(inner, rest, item, f"{prefix}{head}.")
    elif rest and typing.get_origin(inner) is not dict:
        raise ValueError(f"override {item!r}: '{prefix}{head}' has no sub-keys")


def _suggestion(cls: type, prefix: str, key: str) -> str:
    """`; did you mean 'a.b'?` for an unknown key: the closest key of the same section, else a key of
    that name in another section (`lr` at the top level is `optimizer.lr`); empty when none is close."""
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    elsewhere = [name for name in _dotted_keys(RunConfig) if name.rsplit(".", 1)[-1] == key]
    if not elsewhere:
        leaves = {name.rsplit(".", 1)[-1]: name for name in _dotted_keys(RunConfig)}
        elsewhere = [leaves[k] for k in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.8)]
    return f" (did you mean '{elsewhere[0]}'?)" if elsewhere else ""


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of the config tree, dotted (`optimizer.lr`, ...)."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        keys += _dotted_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return keys


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(cls: type, raw: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".")
        raise ValueError(f"{sources.of(where)}: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        hints_text = "".join(_suggestion(cls, prefix, k) for k in unknown)
        raise ValueError(f"{sources.file}: unknown config key(s) {[prefix + k for k in unknown]}{hints_text}")
    values = {name: _coerce(value, hints[name], prefix + name, sources) for name, value in raw.items()}
    return cls(**values)


def _coerce(value: Any, tp: Any, name: str, sources: _Sources) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    source = sources.of(name)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".", sources)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name, sources)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{source}: {name}: {value!r} has the wrong type")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{source}: {name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]", sources) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{source}: {name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        number = _as_float(value)
        if number is not None:
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # Token counts are written `26e9`: accept integral floats and such strings.
        number = _as_float(value)
        if number is not None and number.is_integer():
            return int(number)
    elif isinstance(value, tp):
        return value
    raise ValueError(f"{source}: {name} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def _as_float(value: Any) -> float | None:
    """A finite number, also from a string: PyYAML reads `1e-3` (no dot) as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------------------------------
# `adaponder-train --print-config`: the resolved tree, each key with its default and meaning.


def describe_config(cfg: RunConfig, source: str = "defaults") -> str:
    """The config as YAML that loads back to the same tree; above each key, its meaning (the comment
    or docstring beside the field in the source) and its default when the value differs."""
    lines = [
        f"# adaponder-train run config, resolved: dataclass defaults < {source}",
        "# each key: its meaning, and `default:` where this config changes it (training/config.py)",
    ]
    _describe(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _describe(node: Any, depth: int, lines: list[str]) -> None:
    docs = _field_docs(type(node))
    defaults = _defaults(type(node))
    indent = "  " * depth
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if depth == 0 and dataclasses.is_dataclass(value):
            lines.append("")
        lines += [f"{indent}# {text}" for text in _wrap(docs.get(f.name, ""), 100 - len(indent))]
        if dataclasses.is_dataclass(value):
            if f.name not in docs or not docs[f.name]:
                summary = (inspect.getdoc(type(value)) or "").split("\n\n")[0]
                lines += [f"{indent}# {text}" for text in _wrap(summary, 100 - len(indent))]
            lines.append(f"{indent}{f.name}:")
            _describe(value, depth + 1, lines)
            continue
        plain, default = config_to_dict_value(value), config_to_dict_value(defaults[f.name])
        text = yaml.safe_dump({f.name: plain}, default_flow_style=True, sort_keys=False, width=10**6)
        line = f"{indent}{text.strip()[1:-1]}"
        if plain != default:
            default_text = yaml.safe_dump(default, default_flow_style=True, width=10**6)
            line += f"  # default: {default_text.strip().removesuffix('...').strip()}"
        lines.append(line)


def config_to_dict_value(value: Any) -> Any:
    """One field's value as YAML-safe plain data (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [config_to_dict_value(v) for v in value]
    if isinstance(value, dict):
        return {k: config_to_dict_value(v) for k, v in value.items()}
    return value


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width) if text else []


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation from the class source: the string literal under the field (an
    attribute docstring), else the comment at the end of its line, else the comment lines above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    code_lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs = {}
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[name] = str(after.value.value).replace("``", "`")
        elif stmt.end_lineno in comments:
            docs[name] = comments[stmt.end_lineno]
        else:
            above, line = [], stmt.lineno - 1
            while line in comments and code_lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            docs[name] = " ".join(above)
    return docs
