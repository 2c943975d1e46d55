"""Training and validation metrics: accumulated on each rank, reduced once per interval, written by
rank 0 to TensorBoard (`<run_dir>/tensorboard/`), the console, and DeepSpeed's own monitors when the
run enables them (csv_monitor, wandb: scalars only). docs/metrics.md lists every tag.

FLOPs: the model reports the forward FLOPs of each batch as run adaptively (`total`: halted tokens
computed nowhere) and with every token in every pass (`dense_total`). Throughput and MFU count the
passes actually run: the adaptive FLOPs when training skips halted tokens (`ponder.sparse_training`),
the dense ones when it computes every token in every pass. Model FLOPs per training step
are 3 x that forward (forward + backward); with activation checkpointing the hardware does a 4th
forward, which MFU leaves out by convention. MFU divides by the device's peak dense TFLOP/s for the
run's precision, looked up from the device's name (`detect_peak_tflops`); on CPU it is an estimate
from the threads, clock and vector width, and says so; `logging.peak_tflops` overrides both.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import distributed as dist
from training.rank_status import run_peak_gib

# Names of the TensorBoard scalars, grouped so that TensorBoard shows one panel per group.
TRAIN_SCALARS = (
    "train/lm_loss",
    "train/ponder_loss",
    "train/loss",
    "train/lr",
    "train/lr_gates",
    "train/grad_norm",
    "train/ponder_lambda",
    "train/ponder_k",
    "train/consumed_samples",
    "train/consumed_tokens",
    "perf/tokens_per_sec",
    "perf/tflops_per_rank",
    "perf/mfu",
    "perf/peak_memory_gib",
    "ponder/mean_passes",
    "ponder/adaptive_flops_fraction",
)
EVAL_SCALARS = ("eval/lm_loss", "eval/ppl", "eval/mean_passes")
# Gate-value histogram buckets: fine at both ends, where the gates sit (near 1 while pondering, below
# tau once halting); the model's tau is added as an edge so "halts here" is one bucket.
GATE_EDGES = (0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def gate_edges(halt_threshold: float) -> tuple[float, ...]:
    return tuple(sorted({*GATE_EDGES, halt_threshold}))


def wandb_resume_environment(run_dir: Path) -> dict[str, str]:
    """Environment for DeepSpeed's `wandb.init()` so that every launch of one run directory logs to
    the same Weights & Biases run (resumed after a preemption) instead of starting a new one."""
    run = Path(run_dir).resolve()
    return {
        "WANDB_RUN_ID": hashlib.sha256(str(run).encode()).hexdigest()[:16],
        "WANDB_RESUME": "allow",
        "WANDB_NAME": run.name,
        "WANDB_DIR": str(run),
    }


def peak_memory_gib() -> float:
    """Peak accelerator memory allocated by this process, or its peak resident size on CPU."""
    return run_peak_gib()


# Peak dense (no sparsity) TFLOP/s per device from the vendors' data sheets: (bf16 or fp16, fp32). fp32 is
# the non-tensor-core rate (PyTorch does not use TF32 for matmuls by default). Matched as a substring
# of the device name, first match wins: more specific names come first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM
    ("H800", 989.0, 67.0),
    ("H20", 148.0, 44.0),
    ("B200", 2250.0, 75.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("A40", 149.7, 37.4),
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),  # no bf16: the half-precision column is fp16's
    ("T4", 65.0, 8.1),
    ("MI300X", 1307.4, 163.4),
    ("MI250X", 383.0, 47.9),
)


@dataclass(frozen=True)
class PeakFlops:
    """The peak MFU divides by, and where it came from (printed at the start of a run)."""

    tflops: float | None  # None: unknown device and no logging.peak_tflops; MFU is then NaN
    source: str


def detect_peak_tflops(precision: str, override: float | None = None) -> PeakFlops:
    """Peak dense TFLOP/s of one rank's device for `precision` ("bf16", "fp16" or "fp32")."""
    if override is not None:
        return PeakFlops(override, f"{override:g} TFLOP/s from logging.peak_tflops")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, bf16, fp32 in GPU_PEAK_TFLOPS:
            if key in name:
                peak = bf16 if precision in ("bf16", "fp16") else fp32
                return PeakFlops(peak, f"{name}: {peak:g} TFLOP/s dense {precision} (data sheet)")
        return PeakFlops(None, f"{name} is not in the table of known GPUs: set logging.peak_tflops for MFU")
    return cpu_peak_tflops()


def cpu_peak_tflops() -> PeakFlops:
    """An estimate: threads x clock x fp32 FLOPs per cycle (two FMA units of the widest vectors)."""
    threads = torch.get_num_threads()
    mhz, flags = 0.0, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz" and not mhz:
                mhz = float(value)
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * (2 if "fma" in flags or lanes == 16 else 1)  # FMA = 2 FLOPs, 2 units
    ghz = (mhz or 2000.0) / 1000
    peak = threads * ghz * per_cycle / 1000
    return PeakFlops(
        peak,
        f"CPU estimate, not a measured peak: {threads} threads x {ghz:.2f} GHz x {per_cycle} fp32 "
        f"FLOPs/cycle = {peak:.3g} TFLOP/s",
    )


class TrainMeter:
    """Sums of one logging interval on this rank, kept as float64 tensors on the device.

    Layout of the vector: lm-loss sum, ponder-loss sum, micro-batches, tokens, dense forward FLOPs,
    adaptive forward FLOPs, then tokens by passes run (1..K). Gate values: per update u, counts in
    the buckets of `gate_edges`, then their sum and sum of squares, over the tokens that ran pass u.
    """

    def __init__(
        self,
        num_passes: int,
        device: torch.device,
        num_gates: int = 0,
        halt_threshold: float = 1e-4,
        sparse: bool = False,
    ):
        self._k = num_passes
        # The FLOPs the hardware ran: adaptive (slot 5) when training skips halted tokens, else dense.
        self._run_flops = 5 if sparse else 4
        self._device = device
        self._num_gates = num_gates
        self.edges = gate_edges(halt_threshold)
        self._inner_edges = torch.tensor(self.edges[1:-1], dtype=torch.float32, device=device)
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(6 + self._k, dtype=torch.float64, device=self._device)
        self._gates = torch.zeros(
            self._num_gates, len(self.edges) + 1, dtype=torch.float64, device=self._device
        )
        # Tokens and dense FLOPs carried over from a checkpoint (load_state_dict): counted in the
        # interval's averages, not in its throughput, which this process did not time.
        self._untimed = torch.zeros(2, dtype=torch.float64, device=self._device)
        self.grad_norm = float("nan")  # the interval's last step's (what is logged)
        self.start_clock()

    def start_clock(self) -> None:
        self._started = time.perf_counter()
        self._excluded = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The interval's sums so far on this rank (float64, exact): a checkpoint taken between two
        logged steps carries them, so that the resumed run logs the same interval means."""
        return {
            "sums": self._sums.tolist(),
            "gates": self._gates.tolist(),
            "grad_norm": self.grad_norm,
        }

    def load_state_dict(self, states: list[dict[str, Any]], rank: int, world_size: int) -> None:
        """Continue the interval of a checkpoint; `states` holds every saving rank's state_dict. The
        sums are all-reduced when logged, so on another rank count rank 0 takes all of them."""
        if len(states) == world_size:
            mine = [states[rank]]
        else:
            mine = states if rank == 0 else []
        for state in mine:
            self._sums += torch.tensor(state["sums"], dtype=torch.float64, device=self._device)
            gates = torch.tensor(state["gates"], dtype=torch.float64, device=self._device)
            self._gates += gates.reshape(self._gates.shape)
        self._untimed = self._sums[[3, self._run_flops]].clone()
        self.grad_norm = states[0]["grad_norm"]

    def add_micro_batch(self, out: Any) -> None:
        """Adds on the device (no host read: bincount and boolean indexing would each sync); the
        sums are read once per logging interval, in `reduce`."""
        passes = _counts(out.passes.flatten() - 1, self._k, self._device)
        values = torch.stack(
            [
                out.lm_loss.detach().double(),
                out.ponder_loss.detach().double(),
                torch.ones((), dtype=torch.float64, device=self._device),
                passes.sum(),
                out.flops["dense_total"].double(),
                out.flops["total"].double(),
            ]
        )
        self._sums[:6] += values
        self._sums[6:] += passes
        if self._num_gates:
            self._add_gates(out.gates.detach(), out.passes)

    def _add_gates(self, gates_UBT: torch.Tensor, passes_BT: torch.Tensor) -> None:
        buckets = len(self.edges) - 1
        for u in range(self._num_gates):
            ran = (passes_BT > u).flatten().double()  # gate u only exists for tokens that ran pass u
            s = gates_UBT[u].flatten().float()
            bucket = torch.bucketize(s, self._inner_edges, right=True)
            counts = torch.zeros(buckets, dtype=torch.float64, device=s.device).index_add_(0, bucket, ran)
            s = s.double() * ran
            self._gates[u] += torch.cat([counts, torch.stack([s.sum(), (s * s).sum()])])

    def exclude(self, seconds: float) -> None:
        """Time spent on validation or checkpoints: not part of training throughput."""
        self._excluded += seconds

    def add_step(self, grad_norm: float) -> None:
        self.grad_norm = grad_norm

    def reduce(self) -> dict[str, Any]:
        """Collective: every rank calls it. Returns the interval's metrics over all ranks."""
        elapsed = time.perf_counter() - self._started - self._excluded
        world = dist.world_size()
        memory = torch.zeros(world, dtype=torch.float64, device=self._device)
        memory[dist.rank()] = peak_memory_gib()
        reduced = torch.cat([self._sums, memory, self._gates.flatten(), self._untimed])
        total = dist.all_reduce_sum(reduced).tolist()
        untimed_tokens, untimed_flops = total[-2:]
        gate_rows = total[len(self._sums) + world : -2]
        width = len(self.edges) + 1
        gates = [gate_rows[u * width : (u + 1) * width] for u in range(self._num_gates)]
        lm, ponder, micro, tokens, dense_flops, adaptive_flops = total[:6]
        passes = total[6 : 6 + self._k]
        run_flops = total[self._run_flops]
        model_tflops_per_rank = 3 * (run_flops - untimed_flops) / elapsed / world / 1e12
        return {
            "lm_loss": lm / micro,
            "ponder_loss": ponder / micro,
            "tokens": tokens,
            "tokens_per_sec": (tokens - untimed_tokens) / elapsed,
            "tflops_per_rank": model_tflops_per_rank,
            "adaptive_flops_fraction": adaptive_flops / dense_flops,
            "passes_count": passes,
            "mean_passes": sum((j + 1) * c for j, c in enumerate(passes)) / tokens,
            "halted_fraction": [c / tokens for c in passes],
            "grad_norm": self.grad_norm,
            "peak_memory_gib": total[6 + self._k : 6 + self._k + world],
            "gate_histograms": [
                {"counts": row[:-2], "sum": row[-2], "sum_squares": row[-1], "edges": self.edges}
                for row in gates
            ],
            "elapsed": elapsed,
        }


class EvalMeter:
    """Validation sums on this rank: NLL and token count, overall and by passes run (1..K)."""

    def __init__(self, num_passes: int, device: torch.device):
        self._k = num_passes
        self._nll = torch.zeros(num_passes, dtype=torch.float64, device=device)
        self._count = torch.zeros(num_passes, dtype=torch.float64, device=device)

    def add_micro_batch(self, out: Any) -> None:
        mask = out.loss_mask.flatten()
        passes = out.passes.flatten()[mask] - 1
        self._nll.index_add_(0, passes, out.token_nll.flatten()[mask].double())
        self._count.index_add_(0, passes, torch.ones_like(passes, dtype=torch.float64))

    def reduce(self) -> dict[str, Any]:
        """Collective. Mean NLL of tokens grouped by passes run: the paper's analysis of whether
        tokens that halt early are the easy ones."""
        nll, count = dist.all_reduce_sum(torch.stack([self._nll, self._count])).tolist()
        tokens = sum(count)
        loss = sum(nll) / tokens
        return {
            "lm_loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "mean_passes": sum((j + 1) * c for j, c in enumerate(count)) / tokens,
            "nll_by_passes": [n / c if c else float("nan") for n, c in zip(nll, count)],
            "token_fraction_by_passes": [c / tokens for c in count],
            "tokens": tokens,
        }


def _duration(seconds: float) -> str:
    """`1d 02:03:04`, `02:03:04`; `?` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


class MetricsWriter:
    """Rank 0 writes TensorBoard events and console lines; on other ranks every call does nothing."""

    def __init__(
        self,
        tensorboard_dir: Path,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        monitor: Callable[[list[tuple[str, float, int]]], None] | None = None,
    ):
        self._main = dist.is_main_process()
        self._monitor = monitor  # DeepSpeed's MonitorMaster.write_events (csv_monitor, wandb)
        self._writer = None
        self._bar = None
        if not self._main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self._total = total_steps
        self._start_step = start_step
        self._started = time.monotonic()
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def text(self, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text)

    def console(self, line: str) -> None:
        if not self._main:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        if self._monitor is not None:
            self._monitor([(name, float(value), step) for name, value in scalars.items()])

    def train(
        self,
        step: int,
        scalars: dict[str, float],
        passes_count: list[float],
        gate_histograms: list[dict[str, Any]] = (),
    ) -> None:
        """`scalars` keyed by the names in TRAIN_SCALARS; plus the fraction of tokens halting after each
        pass, a histogram of passes per token and one of each gate's values, all at this step."""
        if self._writer is None:
            return
        tokens = sum(passes_count)
        halting = {f"ponder/halted_after_pass_{j + 1}": c / tokens for j, c in enumerate(passes_count)}
        self._scalars({**scalars, **halting}, step)
        self._passes_histogram("ponder/passes_per_token", passes_count, step)
        for u, histogram in enumerate(gate_histograms):
            self._gate_histogram(f"ponder/gate_values/{u}", histogram, step)
        backbone_lr = scalars.get("train/lr_backbone", scalars["train/lr"])  # 0 while the gates train alone
        self.console(
            f"step {step}/{self._total} | loss {scalars['train/lm_loss']:.4f} | "
            f"ponder {scalars['train/ponder_loss']:.4f} | lr {backbone_lr:.3g} | "
            f"gate lr {scalars['train/lr_gates']:.3g} | gnorm {scalars['train/grad_norm']:.3f} | "
            f"passes {scalars['ponder/mean_passes']:.3f} | "
            f"{scalars['perf/tokens_per_sec']:,.0f} tok/s | "
            f"{scalars['perf/tflops_per_rank']:.3g} TFLOP/s/rank | "
            f"MFU {100 * scalars['perf/mfu']:.2f}% | {scalars['train/consumed_tokens']:,.0f} tokens | "
            f"{self._clock(step)}"
        )

    def _clock(self, step: int) -> str:
        """Wall time, this launch's elapsed time and the estimated time to the last step (from this
        launch's steps so far, validation and checkpoints included): the progress bar's figures, also
        in a log file (a Slurm job's), where there is no bar."""
        elapsed = time.monotonic() - self._started
        done = step - self._start_step
        eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
        return f"{time.strftime('%Y-%m-%d %H:%M:%S')} | elapsed {_duration(elapsed)} | ETA {_duration(eta)}"

    def _passes_histogram(self, tag: str, passes_count: list[float], step: int) -> None:
        values = [float(j + 1) for j in range(len(passes_count))]
        total = sum(passes_count)
        nonzero = [v for v, c in zip(values, passes_count) if c]
        self._writer.add_histogram_raw(
            tag,
            min=min(nonzero),
            max=max(nonzero),
            num=total,
            sum=sum(v * c for v, c in zip(values, passes_count)),
            sum_squares=sum(v * v * c for v, c in zip(values, passes_count)),
            bucket_limits=[v + 0.5 for v in values],
            bucket_counts=passes_count,
            global_step=step,
        )

    def _gate_histogram(self, tag: str, histogram: dict[str, Any], step: int) -> None:
        """Counts per bucket of `gate_edges`; min and max are the edges of the outer non-empty buckets."""
        counts, edges = histogram["counts"], histogram["edges"]
        filled = [i for i, c in enumerate(counts) if c]
        if not filled:
            return
        self._writer.add_histogram_raw(
            tag,
            min=edges[filled[0]],
            max=edges[filled[-1] + 1],
            num=sum(counts),
            sum=histogram["sum"],
            sum_squares=histogram["sum_squares"],
            bucket_limits=list(edges[1:]),
            bucket_counts=counts,
            global_step=step,
        )

    def eval(self, step: int, result: dict[str, Any]) -> None:
        if self._writer is None:
            return
        scalars = {f"eval/{name}": result[name] for name in ("lm_loss", "ppl", "mean_passes")}
        for j, (nll, frac) in enumerate(zip(result["nll_by_passes"], result["token_fraction_by_passes"])):
            if frac:
                scalars[f"eval/nll_by_passes/{j + 1}"] = nll
            scalars[f"eval/token_fraction_by_passes/{j + 1}"] = frac
        self._scalars(scalars, step)
        nll_text = ", ".join(
            f"{j + 1}: {nll:.3f} ({100 * frac:.1f}%)"
            for j, (nll, frac) in enumerate(zip(result["nll_by_passes"], result["token_fraction_by_passes"]))
            if frac
        )
        self.console(
            f"eval @ step {step} | loss {result['lm_loss']:.4f} | ppl {result['ppl']:.2f} | "
            f"passes {result['mean_passes']:.3f} | NLL by passes run {{{nll_text}}}"
        )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _counts(index_N: torch.Tensor, size: int, device: Any) -> torch.Tensor:
    """How often each of 0 .. size - 1 occurs in `index_N`, [size] float64, without a host read."""
    counts = torch.zeros(size, dtype=torch.float64, device=device)
    return counts.index_add_(
        0, index_N.to(device), torch.ones_like(index_N, dtype=torch.float64, device=device)
    )
