"""The DeepSpeed boundary: the only module of the project that imports `deepspeed`.

It fills the DeepSpeed JSON from the run config, builds the model under `deepspeed.zero.Init`
(ZeRO-3: no rank ever holds the whole model), writes weights into partitioned parameters, and wraps
the engine behind a small interface (forward, backward, step, learning rates, save, load).

Checkpoint loading avoids the ZeRO-3 weights-only trap (deepspeedai/DeepSpeed#8499):
it never loads weights alone through the engine. Resuming on the same number of ranks loads the full
state (module + optimizer) by explicit tag; on another number of ranks (where ZeRO shards do not fit)
rank 0 rebuilds the fp32 weights from the checkpoint's optimizer shards *with the tag passed* and
writes them into the model before the engine (and its fp32 master copy) exists; once the engine
exists, the Adam moments, rebuilt the same way (`consolidated_optimizer_state`, ZeRO-3), are written
into its partitions with DeepSpeed's `safe_set_full_optimizer_state`, with the step counts.
(DeepSpeed's universal checkpoint would do this too; converting and loading it ran on CPU, but the
first step after it did not match an uninterrupted run's update, so it is not used.)

DeepSpeed unpickles its checkpoint files fully; every `.pt` file is first opened with PyTorch's
weights-only unpickler and an allowlist of the types DeepSpeed writes (`check_safe_to_load`), so a
file carrying anything else is refused before DeepSpeed runs code from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.utils import safe_set_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from training.config import BatchPlan, RunConfig
from training.memory import model_sizes, zero_buckets

# DeepSpeed's ZeRO calls collectives torch has deprecated; the warnings are not ours to act on, and
# they repeated on every call (something resets the warning registry each step): 60 MB of a 1000-step
# run's log was this one line. Every rank printed the all-gather one at the first gather.
_DEPRECATED = ("reduce_scatter_tensor", "all_gather_into_tensor", "_all_gather_base", "_reduce_scatter_base")
for _collective in _DEPRECATED:
    warnings.filterwarnings(
        "ignore", rf"`torch\.distributed\.{_collective}` (is deprecated|is a private function)", FutureWarning
    )


def _owned_values(cfg: RunConfig, plan: BatchPlan) -> dict[str, Any]:
    """DeepSpeed settings the run config owns, by dotted path into the JSON: a JSON value of
    "auto" (or none) is filled in, any other value must agree."""
    opt = cfg.optimizer
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": opt.grad_clip,
        "bf16.enabled": cfg.precision == "bf16",
        "fp16.enabled": cfg.precision == "fp16",
        # Gradients of half-precision runs accumulate over the micro-batches (up to 64 in the large
        # recipes) in fp32, not in the parameters' dtype (DeepSpeed's default).
        "data_types.grad_accum_dtype": "fp32",
        "optimizer.type": "AdamW",
        "optimizer.params.lr": opt.lr,
        "optimizer.params.betas": list(opt.betas),
        "optimizer.params.eps": opt.eps,
        "optimizer.params.weight_decay": opt.weight_decay,
        **_monitor_values(cfg),
    }


def _monitor_values(cfg: RunConfig) -> dict[str, Any]:
    """DeepSpeed's monitors: csv_monitor and wandb as the run config's `logging` asks; its TensorBoard
    monitor stays off (training.metrics writes `<run_dir>/tensorboard/` with more than it would)."""
    log = cfg.logging
    values: dict[str, Any] = {
        "tensorboard.enabled": False,
        "csv_monitor.enabled": log.csv_monitor,
        "wandb.enabled": log.wandb_project is not None,
    }
    if log.csv_monitor:
        values["csv_monitor.output_path"] = str(Path(cfg.run_dir) / "monitor")
        values["csv_monitor.job_name"] = "csv"
    if log.wandb_project is not None:
        values["wandb.project"] = log.wandb_project
        values["wandb.team"] = log.wandb_team
    return values


def load_ds_config(path: Path, cfg: RunConfig, plan: BatchPlan) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill the values the run config owns; contradictions are errors."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the DeepSpeed config ({e})") from e
    if "scheduler" in ds:
        raise ValueError(f"{path}: remove 'scheduler'; the learning-rate schedule is the run config's")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    for key, value in _owned_values(cfg, plan).items():
        _fill(ds, key, value, path)
    offloaded = ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none") != "none"
    _fill_buckets(ds, zero_buckets(cfg.model_config(), stage, params_offloaded=offloaded), path)
    _fill_nvme_offload(ds, cfg, path)
    if ds.get("fp16", {}).get("enabled") and ds["fp16"].get("loss_scale", 0) == 0:
        ds["fp16"].update({**FP16_DYNAMIC_LOSS_SCALE, **ds["fp16"]})
    _fill_optimizer_kind(ds["optimizer"]["params"], ds, on_accelerator())
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return ds


# fp16: dynamic loss scaling (loss_scale 0) from 2^16, halved on an overflow (the step is skipped),
# doubled after 1000 steps without one. The scaler's state is part of the optimizer checkpoint.
FP16_DYNAMIC_LOSS_SCALE = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def on_accelerator() -> bool:
    return get_accelerator().device_name() != "cpu"


def _fill_optimizer_kind(params: dict[str, Any], ds: dict[str, Any], accelerator: bool) -> None:
    """Which AdamW DeepSpeed builds: torch's (`torch_adam`), nothing to compile on any node.

    On an accelerator torch's fused kernel (`fused`; DeepSpeed's own FusedAdam would be JIT-compiled
    with nvcc on first use). With the optimizer offloaded to CPU memory on a GPU node, DeepSpeed's
    CPU Adam (built once with the host's C++ compiler, several times faster than torch's on CPU).
    A value set in the JSON is the user's choice.
    """
    offloaded = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    if not (accelerator and offloaded):
        params.setdefault("torch_adam", True)
    if accelerator and not offloaded:
        params.setdefault("fused", True)


def _fill(ds: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ValueError(
            f'{path}: {dotted} is {current!r} but the run config implies {value!r}; set it to "auto"'
        )


def _fill_buckets(ds: dict[str, Any], sizes: dict[str, int], path: Path) -> None:
    """Communication buckets and ZeRO-3 gathering limits, in elements: "auto" (or absent) takes the
    size derived from the model (training.memory.zero_buckets); a number is the user's choice."""
    zero = ds["zero_optimization"]
    for key, value in sizes.items():
        current = zero.get(key, "auto")
        if current == "auto":
            zero[key] = value
        elif isinstance(current, bool) or not isinstance(current, (int, float)) or current < 0:
            raise ValueError(
                f'{path}: zero_optimization.{key} must be "auto" or a number >= 0, got {current!r}'
            )


def _fill_nvme_offload(ds: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """NVMe offload (ZeRO-Infinity): "auto" swap directory `<run_dir>/nvme-offload` (point it at a
    local NVMe disk for real runs) and parameter swap buffers that hold the largest tensor."""
    zero = ds["zero_optimization"]
    for section in ("offload_param", "offload_optimizer"):
        offload = zero.get(section, {})
        if offload.get("device") != "nvme":
            continue
        if offload.get("nvme_path", "auto") == "auto":
            offload["nvme_path"] = str((Path(cfg.run_dir) / "nvme-offload").resolve())
        if section == "offload_param" and offload.get("buffer_size", "auto") == "auto":
            offload["buffer_size"] = model_sizes(cfg.model_config()).largest_tensor
    for section in ("offload_param", "offload_optimizer"):
        if zero.get(section, {}).get("device") == "nvme" and "auto" in json.dumps(zero[section]):
            raise ValueError(
                f'{path}: zero_optimization.{section} has an "auto" value this project does not fill'
            )


def nvme_offload_available() -> bool:
    """DeepSpeed's async_io op (NVMe offload) can be built here: libaio and its headers are found.
    Building it the first time (JIT) takes minutes; it is cached in ~/.cache/torch_extensions."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


def zero3_model_states_estimate(total_params: int, largest_layer_params: int, world_size: int) -> int:
    """DeepSpeed's own estimate of ZeRO-3 model-state bytes per GPU (mixed precision, no offload:
    18 bytes per parameter over the ranks, plus the largest layer gathered in fp32)."""
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=world_size,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    return gpu_bytes


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])


def init_distributed() -> None:
    """Start the process group (gloo on CPU, NCCL on GPUs) from the launcher's environment."""
    # zero.Init allocates on the current device before deepspeed.initialize would set it.
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _announce_cpu_comm_op_build()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _unlink_cpu_comm_workspace()


def extensions_dir() -> Path:
    """Where torch builds C++ ops (TORCH_EXTENSIONS_DIR, set here unless the user set it): keyed by
    this Python environment and torch version, so that two venvs sharing a home directory do not
    rebuild one cache for each other on every start (torch's default is keyed by Python version only)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from torch.utils.cpp_extension import get_default_build_root

        key = hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
        venv = Path(sys.prefix).name
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root(), f"{venv}-{key}"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _announce_cpu_comm_op_build() -> None:
    """DeepSpeed's CPU collectives JIT-compile a C++ op (deepspeed_shm_comm) on the first start in an
    environment, silently, for a minute or more: say so (once per node) before it starts."""
    if get_accelerator().device_name() != "cpu":
        return
    build = extensions_dir() / "deepspeed_shm_comm"
    if (build / "deepspeed_shm_comm.so").is_file() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    message = (
        f"compiling DeepSpeed's shared-memory communication op (first start in this environment: "
        f"minutes; cached in {build})"
    )
    if (build / "lock").exists():
        # torch waits, without a word and without end, while this file exists; a start killed while
        # compiling leaves it behind.
        message += (
            f"; waiting for another process compiling it: if none is, one was killed while compiling, "
            f"and {build / 'lock'} must be deleted"
        )
    print(message, flush=True)


def _unlink_cpu_comm_workspace() -> None:
    """Remove the name of this rank's shared-memory workspace of DeepSpeed's CPU collectives.

    Under the `deepspeed` launcher (it sets LOCAL_SIZE) each CPU rank creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MiB) and maps every rank's,
    and DeepSpeed never unlinks them: each run left 66 MiB per rank of memory behind (4.9 GiB in
    /dev/shm on the shared test machine). init_distributed returns once this rank has mapped all
    workspaces; after a barrier every rank has, so the names are no longer needed, and unlinking
    them now frees the memory when the ranks exit, killed or not.
    """
    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return
    dist.barrier()
    env = os.environ
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    )
    Path("/dev/shm", f"{name}_{dist.get_rank()}").unlink(missing_ok=True)


def accelerator_memory_bytes() -> int | None:
    """Memory of this rank's accelerator; None on CPU, where the ranks share the host's memory."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return None
    return int(accelerator.total_memory())


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def build_model(factory: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """Construct the model; under ZeRO-3 every parameter is partitioned as soon as it is created."""
    if zero_stage(ds_config) != 3:
        return factory()
    # zero.Init patches tensor construction; torch._dynamo fails if first imported inside it
    # (its polyfills check torch.Tensor.__new__'s signature), so import it before.
    import torch._dynamo  # noqa: F401

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return factory()


def gather_for_write(params: list[nn.Parameter]) -> AbstractContextManager:
    """Materialise partitioned `params`; on exit rank 0's values are published to every rank."""
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def write_weights(model: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Copy rank 0's `state` (full tensors, names as in `model`) into `model` on every rank.

    Other ranks pass None. Parameters missing from `state` keep their values. Runs before
    `deepspeed.initialize`, so the optimizer's fp32 master copy is built from these weights.
    """
    partitioned = is_partitioned(model)
    if not partitioned and dist.is_initialized():
        # ZeRO-1/2 build the model on the host; NCCL broadcasts accelerator tensors only, so the
        # model moves to this rank's device first (deepspeed.initialize would move it there anyway).
        model.to(device())
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(prefix=prefix, recurse=False))
        if not params:
            continue
        with gather_for_write(list(params.values())) if partitioned else nullcontext():
            if state is not None:
                with torch.no_grad():
                    for name, param in params.items():
                        if name in state:
                            param.copy_(state[name].to(param.dtype))
        if not partitioned and dist.is_initialized():
            for param in params.values():
                dist.broadcast(param.data, src=0)


def local_parameter_count(model: nn.Module) -> int:
    """Parameter elements resident on this rank between steps.

    ZeRO-3: this rank's partition (padding included), plus the whole of every "persistent"
    parameter (smaller than stage3_param_persistence_threshold), which stays gathered.
    """

    def resident(p: nn.Parameter) -> int:
        if not hasattr(p, "ds_tensor"):
            return p.numel()
        return p.ds_tensor.numel() + (p.ds_numel if p.ds_persist else 0)

    return sum(resident(p) for p in model.parameters())


def full_shape(param: nn.Parameter) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 has replaced its data by a placeholder."""
    return getattr(param, "ds_shape", param.shape)


def _checkpoint_globals() -> list[Any]:
    """The only non-tensor types DeepSpeed's checkpoint files hold (fp32/bf16, ZeRO 1-3): the loss
    scaler and stage enum of the optimizer state, ZeRO-1/2's parameter-slice addresses (a dataclass
    of two ints), and numpy arrays (NumPy's RNG state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct

    numeric = [np.dtype(t) for t in (np.uint8, np.int32, np.uint32, np.int64, np.float32, np.float64)]
    return [
        np.ndarray,
        np.dtype,
        *(type(d) for d in numeric),
        _reconstruct,
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
    ]


def check_safe_to_load(path: Path) -> None:
    """Refuse a `.pt` file that holds anything but tensors, plain containers and `_checkpoint_globals`.

    DeepSpeed loads its files with full unpickling, which runs whatever code a file carries; every
    file goes through PyTorch's weights-only unpickler first (which only ever builds allowlisted
    types), with the tensor data memory-mapped rather than read.
    """
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split(". ")[0]
        raise ValueError(
            f"{path}: refused to load: it holds pickled objects other than the tensors and types DeepSpeed "
            f"writes, and loading it could run code from it ({reason})"
        ) from None
    except (
        OSError,
        RuntimeError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        KeyError,
        IndexError,
    ) as e:
        # An allowlisted type built from bad arguments (np.dtype("X9")) fails in its own way.
        raise ValueError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def check_checkpoint_files(checkpoint_dir: str | Path, tag: str) -> None:
    """`check_safe_to_load` for every `.pt` file of checkpoint `tag`."""
    for path in sorted((Path(checkpoint_dir) / tag).glob("*.pt")):
        check_safe_to_load(path)


def consolidated_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of checkpoint `tag`, rebuilt from its optimizer shards (any stage).

    The tag is always passed explicitly: without it DeepSpeed reads `latest` (#8499). Every file
    passes `check_safe_to_load` before DeepSpeed unpickles it.
    """
    check_checkpoint_files(checkpoint_dir, tag)
    if _is_bf16_optimizer_checkpoint(Path(checkpoint_dir) / tag):
        return _bf16_optimizer_state_dict(Path(checkpoint_dir) / tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _is_bf16_optimizer_checkpoint(path: Path) -> bool:
    """ZeRO optimizers record their stage; BF16_Optimizer does not (its files are named like
    ZeRO-3's in bf16: bf16_zero_pp_rank_*)."""
    first = next(path.glob("*_optim_states.pt"), None)
    if first is None:
        return False
    with torch.serialization.safe_globals(_checkpoint_globals()):
        state = torch.load(first, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]
    return "zero_stage" not in state and "param_slice_mappings" in state


def _bf16_optimizer_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16 with fp32
    gradient accumulation), whose files zero_to_fp32 does not read: every rank's fp32 partition of
    each parameter group, and where each parameter's slice lies in it (`param_slice_mappings`).
    A parameter's slices, in rank order, make up the parameter."""
    from deepspeed.utils import zero_to_fp32

    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(path)))
    shapes = {name: shape for group in model_states[0].param_shapes for name, shape in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for file in zero_to_fp32.get_optim_files(str(path)):  # in rank order
        with torch.serialization.safe_globals(_checkpoint_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces[name].append(flat.narrow(0, address.start, address.numel))
    weights = {name: torch.cat(pieces[name]).view(shape).clone() for name, shape in shapes.items()}
    return {**model_states[0].buffers, **weights}


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def consolidated_optimizer_state(checkpoint_dir: str | Path, tag: str) -> tuple[dict[str, dict], float]:
    """The full Adam moments of every parameter of ZeRO-3 checkpoint `tag` (name -> {exp_avg,
    exp_avg_sq}, fp32) and its Adam step count, for any number of ranks to load.

    The moments are partitioned exactly like the fp32 master weights, so DeepSpeed's own
    reassembly of those (zero_to_fp32) is applied to them. The optimizer files are read with the
    weights-only unpickler only.
    """
    from deepspeed.utils import zero_to_fp32

    path = Path(checkpoint_dir) / tag
    check_checkpoint_files(checkpoint_dir, tag)
    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(path)))
    shards = []
    for file in zero_to_fp32.get_optim_files(str(path)):
        with torch.serialization.safe_globals(_checkpoint_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]
        if int(state["zero_stage"]) != 3:
            raise ValueError(f"{file}: Adam moments carry across rank counts from ZeRO-3 checkpoints only")
        shards.append(state["optimizer_state_dict"]["state"])  # sub-group index -> step, exp_avg, ...
    moments: dict[str, dict] = {}
    for key in ADAM_MOMENTS:
        merged: dict[str, Any] = {}
        flat = [[state[i][key] for i in sorted(state)] for state in shards]
        zero_to_fp32._zero3_merge_trainable_params(merged, len(shards), flat, model_states)
        for name, tensor in merged.items():
            moments.setdefault(name, {})[key] = tensor.contiguous()
    steps = {float(sub["step"]) for state in shards for sub in state.values()}
    assert len(steps) == 1, f"{path}: Adam step counts differ between sub-groups: {steps}"
    return moments, steps.pop()


class _NoMonitor:
    """What DeepSpeed's engine sees as its monitor: disabled, so it writes no events of its own."""

    enabled = False


class Engine:
    """A DeepSpeed engine behind the few calls the trainer makes."""

    def __init__(self, model: nn.Module, param_groups: list[dict[str, Any]], ds_config: dict[str, Any]):
        # Every rank runs every module of every pass, even with no token left to run: ZeRO-3 gathers
        # each module's weights on all ranks together, and gradient reduction (any stage) expects
        # every parameter on every rank.
        model.every_rank_calls_every_module = True
        # DeepSpeed pops keys (e.g. torch_adam) from the dict it is given.
        self._ds, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=copy.deepcopy(ds_config)
        )
        # The monitors (csv_monitor, wandb) take our scalars only (write_events). DeepSpeed's engine
        # would add its own `Train/Samples/lr` each step: the first parameter group's lr (the gates'),
        # at step = samples seen, while ours are at optimizer steps; W&B needs one increasing step
        # and dropped every metric of ours logged at a step below the last samples count.
        self._monitor = self._ds.monitor
        self._ds.monitor = _NoMonitor()

    @property
    def module(self) -> nn.Module:
        return self._ds.module

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups, with the keys of training.optim (name, gates) kept."""
        return self._ds.optimizer.param_groups

    def __call__(self, **inputs: Any) -> Any:
        return self._ds(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed divides by the accumulation steps, and the
        gradient reduction averages over data-parallel ranks."""
        self._ds.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; the optimizer steps at the accumulation boundary."""
        self._ds.step()

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        """(tag, value, step) scalars to the monitors the DeepSpeed config enables (csv_monitor, wandb),
        through the engine's own MonitorMaster; rank 0 writes, the others ignore them."""
        if self._monitor.enabled:
            self._monitor.write_events(events)

    def grad_norm(self) -> float:
        """Global gradient norm before clipping, of the last optimizer step."""
        norm = self._ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._ds.module.parameters()

    def set_optimizer_state(
        self, moments: dict[str, dict] | None, adam_step: float | None, step: int, samples: int
    ) -> None:
        """Every rank: write rank 0's full Adam moments (`consolidated_optimizer_state`; None on other
        ranks) into this engine's ZeRO-3 partitions, and the step counts (Adam's, for its bias
        correction, and the engine's)."""
        box = [adam_step]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        self._create_optimizer_state(box[0])
        for name, param in self._ds.module.named_parameters():
            for key in ADAM_MOMENTS:
                value = moments[name][key] if moments is not None else torch.empty(full_shape(param))
                value = value.to(device(), torch.float32)
                if dist.is_initialized():
                    dist.broadcast(value, src=0)
                self._set_full_moment(param, value.view(full_shape(param)), key)
        self._ds.global_steps, self._ds.global_samples = step, samples

    def _set_full_moment(self, param: nn.Parameter, value: torch.Tensor, key: str) -> None:
        """`safe_set_full_optimizer_state`, also where this rank's partition is padded past the
        parameter's end (deepspeed 0.19.8 narrows past the end there: a 1-element bias on 2 ranks)."""
        zero3 = self._ds.optimizer
        partition, _ = zero3._get_fp32_opt_state_partition(param, False, optim_state_key=key)
        start = partition.numel() * zero3._get_param_partition_rank(param)
        if start + partition.numel() <= value.numel():
            safe_set_full_optimizer_state(param, value, key)
            return
        piece = value.flatten()[start:]
        partition.data.zero_()
        partition.data[: piece.numel()].copy_(piece)

    def _create_optimizer_state(self, adam_step: float) -> None:
        """Adam creates its state at its first step; create it now, at `adam_step`, zero moments."""
        zero3 = self._ds.optimizer
        optimizer = zero3.optimizer  # torch AdamW (CPU), FusedAdam or DeepSpeedCPUAdam
        # torch's Adam keeps the step as a float32 tensor, DeepSpeed's Adams as an int.
        is_torch = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        for flat in zero3.fp32_partitioned_groups_flat:  # one fp32 partition per ZeRO-3 sub-group
            optimizer.state[flat].update(
                step=torch.tensor(adam_step, dtype=torch.float32) if is_torch else int(adam_step),
                exp_avg=torch.zeros_like(flat),
                exp_avg_sq=torch.zeros_like(flat),
            )

    def save(self, checkpoint_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its shards; `latest` is ours to write (training.checkpoint)."""
        self._ds.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, checkpoint_dir: Path, tag: str) -> dict[str, Any]:
        """Full state (module, optimizer) of `tag` on the same number of ranks; returns client state."""
        check_checkpoint_files(checkpoint_dir, tag)
        path, client_state = self._ds.load_checkpoint(
            str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ValueError(f"{checkpoint_dir}/{tag}: DeepSpeed found no checkpoint to load")
        return client_state
