"""Process-group helpers that need only `torch.distributed` (DeepSpeed itself stays in engine.py).

Ranks come from the environment the launcher set: the `deepspeed` launcher and torchrun set
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; under Slurm (`srun python ...`) they are
derived from SLURM_*; a plain `python` process is rank 0 of 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def setup_environment() -> int:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* (from Slurm, or for one process); return the world size.

    Runs before any process group exists, so that the config can be checked against the world
    size first.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = _slurm_device_index(env)
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env.setdefault("MASTER_ADDR", _slurm_first_host())
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return int(env["WORLD_SIZE"])


def _slurm_device_index(env: Mapping[str, str]) -> str:
    """LOCAL_RANK under Slurm: the index of this task's GPU among those it sees (DeepSpeed and
    init_distributed select the device by it).

    Without GPU binding every task of a node sees all of the node's GPUs and takes number
    SLURM_LOCALID. With binding (--gpus-per-task=1, --gpu-bind=single:1) CUDA_VISIBLE_DEVICES lists
    only the task's own GPU, which is device 0 in the task: LOCALID modulo the devices it sees.
    """
    local = int(env.get("SLURM_LOCALID", "0"))
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return str(local % len(visible) if visible else local)


def slurm_port(job_id: str) -> int:
    """A rendezvous port of the job's own (20000-39999), so two jobs sharing a node do not collide;
    launcher/slurm.sh derives the same."""
    return 20000 + int(job_id) % 20000


def _slurm_first_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR ({e})") from e
    return out.stdout.split()[0]


def free_port() -> int:
    """A TCP port free on the loopback interface now (a rendezvous port for local launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL reduces only accelerator tensors; gloo (CPU runs) only host tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on `tensor`'s device (callers use float64: exact for counts)."""
    if not dist.is_initialized():
        return tensor
    reduced = tensor.to(_comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args: Any) -> None:
    if is_main_process():
        print(*args, flush=True)
