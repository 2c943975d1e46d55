"""Memory per rank, planned before a run starts, and the ZeRO sizes derived from the model.

Bytes per rank of a DeepSpeed ZeRO-3 run of N ranks with P parameters (p = bytes of the parameter
dtype: 4 for fp32, 2 for bf16):

    model states    weights p x P/N (plus "persistent" small tensors, whole on every rank),
                    gradient partitions 4 x P/N (accumulated in fp32), fp32 master copy 4 x P/N
                    (also in fp32: DeepSpeed clones), Adam moments 8 x P/N
    gathered        the largest set of full tensors live at once, and in backward their full
                    gradients before the reduce-scatter: the two vocabulary tables of the pondering
                    mixture (softmax(embed_out(h)) @ embed_in), whose gradients autograd accumulates
                    over the K passes, or one layer plus the prefetch bucket (MemoryPlan.gathered);
                    with K > 1 also every layer's full gradient, which autograd sums over the K
                    passes before DeepSpeed's hook can reduce-scatter it (p x the non-vocabulary
                    parameters, not divided by N: MemoryPlan.shared_gradients)
    buckets         the gradient reduce bucket (reduce_bucket_size elements of dtype p)
    step            the optimizer step's transients: DeepSpeed flattens the gradient partition
                    into an fp32 copy, torch's AdamW makes two more partition-sized temporaries
    activations     what autograd keeps at the end of the forward of one micro-batch, for K passes
                    (below), plus the largest transient of the backward: the loss's [T, V] gradient,
                    or under activation checkpointing the recomputed mixture of one pass

Activations, per token of the micro-batch (D hidden, I MLP width, G gate width, V vocabulary, L
layers, K passes), from what each operation of model/modeling.py saves for backward:

    one layer, first pass       10 D + 2 I (x, two LayerNorm outputs, q|k|v, rotated q and k, the
                                attention output and its reshaped copy, MLP input and GELU output)
    one layer, later passes      8 D + 2 I (K/V alignment: `where` makes new k, v; the fused q|k|v
                                output is freed)
    between passes               3 D + 2 G (final-norm input and output, mixture, gate MLP); the
                                mixture runs in token chunks and recomputes them in backward
                                (model/modeling.py), so no [V] tensor is kept between passes
    after the last pass          3 D + the logits [V] (kept by the output) + fp32 log-softmax [V]

Under activation checkpointing a layer keeps only its input x and, after the first pass, the
previous pass's aligned K/V (3 D). The backward's transient peak is the larger of the loss's [T, V]
gradients and the mixture's backward: two fp32 [chunk, V] tensors (the recomputed probabilities and
their gradient; a chunk is MIXTURE_CHUNK_BYTES of fp32 logits) plus the fp32 weight-gradient
accumulators of both vocabulary tables; under checkpointing plus one recomputed layer.
The formulas were checked against torch's MemTracker on
CPU for tiny configs (tests/test_memory.py) and against measured peaks of 2-rank ZeRO-3 runs
(benchmarks/bench_memory.py; BENCHMARKS.md "Memory"). On a GPU add the CUDA context (~0.5-1 GiB)
and allocator fragmentation: the "fits" figure keeps 10% and 1 GiB in reserve.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.mixture import MIXTURE_CHUNK_BYTES

GIB = 2**30
FP32 = 4
# A CPU-only rank's resident size grows beyond its tensors by a constant once it has trained a step
# (measured between steps, 2 ranks: 0.084-0.092 GiB from 29M to 418M parameters; about a quarter of
# it code and libraries first run by training, the rest the runtime's own heap).
CPU_RUNTIME = 92 * 2**20
# The host figures assume that freed tensors leave the resident set: glibc serves allocations of
# this size and more with their own mappings, unmapped when freed (`host_allocator`). glibc's default
# threshold starts at 128 KiB and rises to 32 MiB as large blocks are freed, after which freed
# tensors stay resident in the heap (pythia-410m, K=4, 2 CPU ranks: 11.2-11.5 GiB per rank for a
# planned 7.0, 7.3 with this setting).
MMAP_THRESHOLD = 64 * 2**10
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def host_allocator() -> str:
    """Set glibc's mmap threshold in this process, as the plan assumes (before the model is built;
    forked data-loader workers inherit it). A MALLOC_MMAP_THRESHOLD_ in the environment (glibc has
    applied it at start) wins. Returns what was done, for the start-up report."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"glibc mmap threshold {os.environ['MALLOC_MMAP_THRESHOLD_']} (MALLOC_MMAP_THRESHOLD_)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        done = False
    if not done:
        return "glibc's mallopt unavailable: CPU memory may exceed the plan by freed heap"
    return f"glibc mmap threshold {MMAP_THRESHOLD // 1024} KiB (freed tensors leave the resident set)"


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts (elements) that decide gathering and bucket sizes."""

    total: int
    layer: int  # one transformer block
    table: int  # one vocabulary table (embed_in or embed_out): V x D
    largest_tensor: int
    tensors: tuple[int, ...]  # every parameter's element count

    def persistent(self, threshold: int) -> int:
        """Elements ZeRO-3 keeps whole on every rank: tensors below the persistence threshold."""
        return sum(n for n in self.tensors if n < threshold)


def model_sizes(config: AdaPonderConfig) -> ModelSizes:
    """Exact counts from the model built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = AdaPonderForCausalLM(config)
    tensors = tuple(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.gpt_neox.layers[0].parameters())
    return ModelSizes(
        total=sum(tensors),
        layer=layer,
        table=config.vocab_size * config.hidden_size,
        largest_tensor=max(tensors),
        tensors=tensors,
    )


def zero_buckets(config: AdaPonderConfig, stage: int, params_offloaded: bool = False) -> dict[str, int]:
    """ZeRO communication buckets and ZeRO-3 gathering limits (elements), from the model's size.

    Buckets follow DeepSpeed's / transformers' convention (reduce D^2, prefetch 0.9 D^2, persistent
    below 10 D: biases and LayerNorms stay gathered).

    Gather once, ponder K times: with K > 1 passes every weight is used again one pass later, after
    one pass's worth of other parameters. The reuse distance and the live-parameter limit are one
    pass's parameters (the whole model), so ZeRO-3 keeps each weight it gathered in pass 1 for
    passes 2..K and for the backward, instead of gathering every layer K times in forward and again
    in backward (benchmarks/bench_gather.py: a K=4 step all-gathers about the bytes of a K=1 step).
    This costs the whole model's gathered weights on every rank during the step (`MemoryPlan.gathered`;
    5.6 GB in bf16 at 2.8B). A plain K=1 model, and a run whose parameters are offloaded to CPU
    memory or NVMe (it offloads because the weights do not fit), keep DeepSpeed's usual economy: live
    parameters capped at both vocabulary tables or two layers, reuse within one layer.

    The optimizer steps over sub-groups of at most two vocabulary tables' worth of this rank's
    partition, so that its fp32 gradient copy and Adam temporaries stay that size (DeepSpeed's
    default, 1e9, is the whole partition below 1B parameters per rank).
    """
    d = config.hidden_size
    if stage != 3:
        return {"reduce_bucket_size": d * d, "allgather_bucket_size": d * d}
    sizes = model_sizes(config)
    ponders = config.num_passes > 1 and not params_offloaded
    return {
        "reduce_bucket_size": d * d,
        "stage3_prefetch_bucket_size": int(0.9 * d * d),
        "stage3_param_persistence_threshold": 10 * d,
        "stage3_max_live_parameters": sizes.total if ponders else max(2 * sizes.table, 2 * sizes.layer),
        "stage3_max_reuse_distance": sizes.total if ponders else sizes.layer,
        "sub_group_size": 2 * sizes.table,
    }


def activation_bytes(
    config: AdaPonderConfig, tokens: int, dtype_bytes: int, checkpointing: bool
) -> tuple[int, int]:
    """(kept at the end of the forward, extra transient peak in backward) for `tokens` tokens."""
    d, i, g, v = (
        config.hidden_size,
        config.intermediate_size,
        config.gate_intermediate_size,
        config.vocab_size,
    )
    k, layers = config.num_passes, config.num_hidden_layers
    p = dtype_bytes
    later = k - 1  # passes after the first
    stats = FP32 * (config.num_attention_heads + 4)  # attention log-sum-exp, LayerNorm mean/rstd (fp32)
    if checkpointing:
        per_layer = k * d * p + (2 * d * p * later if config.adaptive else 0)
    else:
        first = (10 * d + 2 * i) * p + stats
        rest = ((8 * d + 2 * i) * p + stats) if config.adaptive else first
        per_layer = first + later * rest
    gate = (2 * g * p + 2 * FP32) if config.adaptive else 0
    between = 3 * d * p + gate
    last = 3 * d * p + v * p + FP32 * v
    kept = layers * per_layer + later * between + last
    # Backward: the loss's gradient [V] in fp32 and the logits' gradient (and its cast).
    transient = (2 * FP32 * v + (v * p if p != FP32 else 0)) * tokens
    if later:
        chunk = min(tokens, max(1, MIXTURE_CHUNK_BYTES // (FP32 * v)))
        mixture = 2 * FP32 * chunk * v + 2 * FP32 * v * d
        if checkpointing:
            mixture += ((10 * d + 2 * i) * p + stats) * tokens  # one layer recomputed
        transient = max(transient, mixture)
    return kept * tokens, transient


@dataclass
class MemoryPlan:
    """Bytes per rank for one run; `describe()` is what --dry-run and every run's start print."""

    config: AdaPonderConfig
    sizes: ModelSizes
    world_size: int
    micro_batch: int
    seq_len: int
    precision: str
    checkpointing: bool
    zero: dict[str, Any]  # the filled zero_optimization section
    # Filled in __post_init__.
    states: dict[str, int] = field(default_factory=dict)  # on the accelerator between steps
    host_states: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory
    nvme_states: dict[str, int] = field(default_factory=dict)  # offloaded to local disk

    def __post_init__(self) -> None:
        n, p, sizes = self.world_size, self.dtype_bytes, self.sizes
        shard = math.ceil(sizes.total / n)
        persistent = sizes.persistent(int(self.zero.get("stage3_param_persistence_threshold", 0)))
        # ZeRO-1 partitions the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the weights.
        stage = self.stage
        resident = math.ceil((sizes.total - persistent) / n) + persistent if stage == 3 else sizes.total
        weights = {"weights": p * resident}
        # Gradients accumulate over the micro-batches in fp32 (data_types.grad_accum_dtype).
        grads = FP32 * (sizes.total if stage == 1 else shard)
        optim = {"fp32 master": FP32 * shard, "Adam moments": 2 * FP32 * shard}
        for where, group in (("offload_param", weights), ("offload_optimizer", optim)):
            device = self.zero.get(where, {}).get("device", "none")
            {"cpu": self.host_states, "nvme": self.nvme_states}.get(device, self.states).update(group)
        # With the optimizer offloaded (to CPU or NVMe) ZeRO-3 keeps the gradient partition in CPU
        # memory (stage3.py: grad_partitions_flat_buffer on the offload device), never on disk.
        (self.host_states if self.optimizer_offloaded else self.states)["gradients"] = grads
        if self.zero.get("offload_optimizer", {}).get("device") == "nvme":
            # ... and swaps an fp32 copy of it out beside the optimizer states (measured: the swap
            # folder of 1.4b on 1 rank holds 5 x 4 bytes per parameter).
            self.nvme_states["gradients (swapped)"] = FP32 * shard
        # NVMe offload swaps through buffers in CPU memory: parameters buffer_count x buffer_size
        # elements; the optimizer one sub-group (master, moments, gradient) per buffer.
        offload_param = self.zero.get("offload_param", {})
        if offload_param.get("device") == "nvme":
            size = int(offload_param.get("buffer_size", sizes.largest_tensor))
            self.host_states["parameter swap buffers"] = int(offload_param.get("buffer_count", 5)) * size * p
        offload_optimizer = self.zero.get("offload_optimizer", {})
        if offload_optimizer.get("device") == "nvme":
            group_size = min(shard, int(self.zero.get("sub_group_size", 10**9)))
            count = int(offload_optimizer.get("buffer_count", 4))
            self.host_states["optimizer swap buffers"] = count * group_size * FP32

    @property
    def stage(self) -> int:
        return int(self.zero.get("stage", 3))

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision in ("bf16", "fp16") else FP32

    def gathered(self, phase: str) -> int:
        """Full (gathered) weights live at once in `phase`, and in backward the full gradients that
        autograd holds before DeepSpeed reduce-scatters them.

        Forward: both vocabulary tables for the mixture, or a layer and the prefetch bucket.
        Backward (K > 1): every layer's full gradient (`shared_gradients`); embed_in and embed_out
        are used in every pass, so autograd accumulates a full [V, D] gradient for each from the
        first use it meets until the last (2 tables), and
        each recomputed mixture adds both tables' weights, two new [V, D] contributions and their
        sum (5 tables; measured on CPU with torch's MemTracker at 70m: 5.3 tables of temporaries),
        or, in a layer, its weights and gradients.
        """
        if self.stage != 3:
            return 0  # ZeRO-1/2 keep every weight on every rank (counted in the model states)
        prefetch = int(self.zero.get("stage3_prefetch_bucket_size", 0))
        table, layer = self.sizes.table, self.sizes.layer + prefetch
        if self.gathers_once:
            # Every weight stays gathered from its first use in forward to its last in backward;
            # the mixture's backward adds its [V, D] contributions and their sum (3 tables).
            whole = self.sizes.total
            elements = whole if phase == "forward" else whole + 2 * table + self.shared_gradients + 3 * table
        elif phase == "forward":
            elements = max(2 * table, layer)
        elif self.config.num_passes > 1:
            elements = 2 * table + self.shared_gradients + max(5 * table, 2 * layer)
        else:
            elements = 2 * max(table, layer)
        return elements * self.dtype_bytes

    @property
    def gathers_once(self) -> bool:
        """ZeRO-3 keeps a gathered weight through the K passes and the backward: the reuse distance
        and live-parameter limit hold one pass's parameters (`zero_buckets`)."""
        if self.stage != 3 or self.config.num_passes == 1:
            return False
        limits = ("stage3_max_reuse_distance", "stage3_max_live_parameters")
        return all(int(self.zero.get(key, 0)) >= self.sizes.total for key in limits)

    def communication(self, accumulation: int) -> dict[str, int]:
        """Bytes per optimizer step per rank through ZeRO's collectives: "gathered" (the full weights
        all-gathered) and "reduced" (the full gradients reduce-scattered or all-reduced), counted as
        benchmarks/bench_gather.py counts them. A ring collective moves (N - 1) / N of them through
        each rank's link. Persistent tensors (below the persistence threshold) are never gathered.

        ZeRO-3 gathers every other weight in forward and in backward of every micro-batch: once each
        when it gathers once, else K times each (every pass); it reduce-scatters the gradients once
        per micro-batch. ZeRO-2 reduce-scatters per micro-batch, ZeRO-1 all-reduces per step; both
        all-gather the updated weights once per step.
        """
        p, total, k = self.dtype_bytes, self.sizes.total, self.config.num_passes
        if self.stage == 3:
            gathered = total - self.sizes.persistent(
                int(self.zero.get("stage3_param_persistence_threshold", 0))
            )
            uses = 2 if self.gathers_once or k == 1 else 2 * k
            return {"gathered": p * gathered * uses * accumulation, "reduced": p * total * accumulation}
        reductions = accumulation if self.stage == 2 else 1
        return {"gathered": p * total, "reduced": p * total * reductions}

    def describe_communication(
        self, accumulation: int, forward_flops_per_sample: float, link_gbs: float, sustained_tflops: float
    ) -> str:
        """Communication against compute per optimizer step per rank, for a stated interconnect."""
        n = self.world_size
        comm = self.communication(accumulation)
        moved = (n - 1) / n * sum(comm.values())
        comm_s = moved / (link_gbs * 1e9)
        compute_s = 3 * forward_flops_per_sample * self.micro_batch * accumulation / (sustained_tflops * 1e12)
        bound = "communication" if comm_s > compute_s else "compute"
        once = ", each weight gathered once per forward and once per backward" if self.gathers_once else ""
        return (
            f"communication per step per rank (ZeRO-{self.stage}, {accumulation} micro-batches{once}): "
            f"all-gathered {comm['gathered'] / GIB:.2f} GiB, reduced {comm['reduced'] / GIB:.2f} GiB; "
            f"{moved / GIB:.2f} GiB through each rank's link over {n} ranks\n"
            f"  at {link_gbs:g} GB/s per rank (ring collectives, no overlap): {comm_s:.2f} s; compute "
            f"{compute_s:.2f} s at {sustained_tflops:g} TFLOP/s sustained (3 x forward FLOPs of K passes, "
            f"dense) -> {bound}-bound, communication / compute {comm_s / compute_s:.2f}"
        )

    @property
    def shared_gradients(self) -> int:
        """Elements of the full gradients that every layer (and the gate) holds through most of a
        K-pass backward under ZeRO-3: each weight is used once per pass, so autograd sums its K
        contributions in the graph before its accumulate-grad hook (where DeepSpeed reduce-scatters
        and frees the gradient) fires once, after the first pass's backward. From the last pass's
        backward of a layer to the first pass's, its whole gradient is live: all layers at once
        while the first pass is differentiated. The vocabulary tables are counted in `gathered`."""
        if self.stage != 3 or self.config.num_passes == 1:
            return 0
        return self.sizes.total - 2 * self.sizes.table

    @property
    def buckets(self) -> int:
        return int(self.zero.get("reduce_bucket_size", 0)) * self.dtype_bytes

    @property
    def optimizer_offloaded(self) -> bool:
        return self.zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")

    @property
    def step_transient(self) -> int:
        """DeepSpeed's flattened fp32 gradient and torch AdamW's two temporaries (the square root
        of the second moment, the update), per sub-group of the partition; in CPU memory when the
        optimizer is offloaded."""
        sub_group = int(self.zero.get("sub_group_size", 10**9))
        return 3 * FP32 * min(math.ceil(self.sizes.total / self.world_size), sub_group)

    def activations(
        self, micro_batch: int | None = None, checkpointing: bool | None = None
    ) -> tuple[int, int]:
        tokens = (self.micro_batch if micro_batch is None else micro_batch) * self.seq_len
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return activation_bytes(self.config, tokens, self.dtype_bytes, ckpt)

    def phase_peaks(
        self, micro_batch: int | None = None, checkpointing: bool | None = None, host: bool = False
    ) -> dict[str, int]:
        """Planned peak of each phase on the accelerator; with `host`, of a CPU-only run: what is
        offloaded to CPU memory too (the same memory there) and the runtime's constant (CPU_RUNTIME)."""
        states = sum(self.states.values())
        if host:
            states += sum(self.host_states.values()) + CPU_RUNTIME
        kept, transient = self.activations(micro_batch, checkpointing)
        return {
            "init": states,
            "forward": states + self.gathered("forward") + kept,
            "backward": states + self.gathered("backward") + self.buckets + kept + transient,
            "step": states + (self.step_transient if host or not self.optimizer_offloaded else 0),
        }

    def peak(
        self, micro_batch: int | None = None, checkpointing: bool | None = None, host: bool = False
    ) -> int:
        return max(self.phase_peaks(micro_batch, checkpointing, host).values())

    def max_micro_batch(self, device_bytes: int, checkpointing: bool | None = None) -> int:
        """The largest micro-batch whose planned peak leaves 10% and 1 GiB of `device_bytes` free."""
        usable = 0.9 * device_bytes - GIB

        def fits(micro_batch: int) -> bool:
            return self.peak(micro_batch, checkpointing) <= usable

        # The peak grows with the micro-batch, not linearly (the mixture's backward works in chunks
        # of fixed size): double, then bisect.
        if not fits(1):
            return 0
        low = 1
        while fits(2 * low) and low < 2**20:
            low *= 2
        high = 2 * low  # fits(low), not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def activation_per_sample(self, checkpointing: bool | None = None) -> int:
        kept, transient = self.activations(1, checkpointing)
        return kept + transient

    def describe(self, device_gib: float | None = None, ds_estimate: int | None = None) -> str:
        g = GIB
        c, s = self.config, self.sizes
        ckpt = "on" if self.checkpointing else "off"
        lines = [
            f"memory plan per rank: ZeRO-{self.stage} over {self.world_size} ranks, {self.precision}, "
            f"micro-batch {self.micro_batch} x {self.seq_len} tokens, K={c.num_passes} passes, "
            f"activation checkpointing {ckpt}",
            f"  parameters {s.total:,} (one layer {s.layer:,}; vocabulary table {s.table:,}); "
            f"per rank {math.ceil(s.total / self.world_size):,}",
        ]
        for name, group in (("on the device", self.states), ("in CPU memory", self.host_states)):
            if group:
                parts = ", ".join(f"{k} {v / g:.2f}" for k, v in group.items())
                lines.append(f"  model states {name}: {sum(group.values()) / g:.2f} GiB ({parts})")
        if self.nvme_states:
            lines.append(f"  model states on NVMe: {sum(self.nvme_states.values()) / g:.2f} GiB")
        if ds_estimate is not None:
            lines.append(
                f"  DeepSpeed's estimate (estimate_zero3_model_states_mem_needs, mixed precision, no "
                f"offload): {ds_estimate / g:.2f} GiB"
            )
        lines.append(
            f"  gathered weights {self.gathered('forward') / g:.2f} GiB in forward, with full gradients "
            f"{self.gathered('backward') / g:.2f} GiB in backward (the layers' gradients summed over "
            f"the passes {self.shared_gradients * self.dtype_bytes / g:.2f}); reduce bucket "
            f"{self.buckets / g:.3f} GiB; optimizer-step transients {self.step_transient / g:.2f} GiB"
        )
        for flag in (self.checkpointing, not self.checkpointing):
            kept, transient = self.activations(checkpointing=flag)
            lines.append(
                f"  activations for {c.num_passes} passes with checkpointing {'on' if flag else 'off'}: "
                f"{kept / g:.2f} GiB kept + {transient / g:.2f} GiB backward transient "
                f"-> peak {self.peak(checkpointing=flag) / g:.2f} GiB"
                + ("  <- this run" if flag == self.checkpointing else "")
            )
        peaks = ", ".join(f"{k} {v / g:.2f}" for k, v in self.phase_peaks().items())
        lines.append(f"  planned peak {self.peak() / g:.2f} GiB ({peaks})")
        if self.host_states:
            host = ", ".join(f"{k} {v / g:.2f}" for k, v in self.phase_peaks(host=True).items())
            lines.append(
                f"  in CPU memory as well (a CPU-only run): {self.peak(host=True) / g:.2f} GiB ({host})"
            )
        if device_gib:
            fits = [f"{self.max_micro_batch(int(device_gib * g), flag)}" for flag in (True, False)]
            lines.append(
                f"  largest micro-batch in {device_gib:g} GiB: {fits[0]} with activation checkpointing, "
                f"{fits[1]} without"
            )
        return "\n".join(lines)


def dense_forward_flops(config: AdaPonderConfig, seq_len: int) -> float:
    """Forward FLOPs of one sample of `seq_len` tokens with every token in every pass."""
    from model.modeling import forward_flops

    active = torch.ones(config.num_passes, 1, seq_len, dtype=torch.bool)
    return float(forward_flops(config, active, torch.ones(1, seq_len, dtype=torch.bool))["dense_total"])


def plan_memory(config: AdaPonderConfig, cfg: Any, world_size: int, ds_config: dict[str, Any]) -> MemoryPlan:
    """The plan of run config `cfg` (training.config.RunConfig) on `world_size` ranks."""
    return MemoryPlan(
        config=config,
        sizes=model_sizes(config),
        world_size=world_size,
        micro_batch=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
        precision=cfg.precision,
        checkpointing=cfg.activation_checkpointing,
        zero=ds_config.get("zero_optimization", {}),
    )
