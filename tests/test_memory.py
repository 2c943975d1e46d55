"""The memory planner, the ZeRO sizes derived from the model, MFU's device peak, and the report that
names a rank that died (a real 2-rank DeepSpeed run, one rank killed with SIGKILL mid-training)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import command, environment, make_config
from torch.distributed._tools.mem_tracker import MemTracker

from model import AdaPonderConfig, AdaPonderForCausalLM
from training import metrics, pretrain, rank_status
from training.config import plan_batches, read_config
from training.engine import load_ds_config, nvme_offload_available, zero3_model_states_estimate
from training.memory import activation_bytes, plan_memory, zero_buckets
from training.rank_status import RankStatus, read_statuses

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "ds_configs" / "zero3.json"


def tiny_run_config(hidden: int, vocab: int = 512):
    return read_config(
        None,
        [
            "model.preset=tiny",
            f"model.overrides.hidden_size={hidden}",
            f"model.overrides.intermediate_size={4 * hidden}",
            f"model.overrides.vocab_size={vocab}",
            "seq_len=32",
            "micro_batch_size=2",
            "global_batch_size=4",
            "train_steps=1",
            "precision=fp32",
        ],
    )


@pytest.mark.parametrize("hidden", [64, 128])
def test_zero3_buckets_follow_the_models_size(hidden):
    cfg = tiny_run_config(hidden)
    zero = load_ds_config(ZERO3, cfg, plan_batches(cfg, 2))["zero_optimization"]
    model = AdaPonderForCausalLM(cfg.model_config())
    layer = sum(p.numel() for p in model.gpt_neox.layers[0].parameters())
    table = model.gpt_neox.embed_in.weight.numel()
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    # K passes: one pass's parameters (the whole model), so each weight is gathered once per step.
    total = sum(p.numel() for p in model.parameters())
    assert cfg.model_config().num_passes > 1
    assert zero["stage3_max_reuse_distance"] == zero["stage3_max_live_parameters"] == total
    one_pass = cfg.model_config()
    one_pass.num_passes = 1  # a plain model: released after each use
    k1 = zero_buckets(one_pass, 3)
    assert k1["stage3_max_reuse_distance"] == layer
    assert k1["stage3_max_live_parameters"] == max(2 * table, 2 * layer)
    assert zero["sub_group_size"] == 2 * table
    # Biases and LayerNorms stay gathered; every D x D-or-larger matrix is partitioned.
    threshold = zero["stage3_param_persistence_threshold"]
    assert all(p.numel() < threshold for p in model.parameters() if p.ndim == 1)
    assert all(p.numel() >= threshold for p in model.parameters() if p.ndim == 2 and min(p.shape) >= hidden)


def test_explicit_bucket_sizes_are_kept_and_bad_ones_named(tmp_path):
    ds = json.loads(ZERO3.read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 12345
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = tiny_run_config(64)
    zero = load_ds_config(path, cfg, plan_batches(cfg, 2))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    ds["zero_optimization"]["stage3_max_live_parameters"] = "lots"
    path.write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=r"ds\.json: zero_optimization\.stage3_max_live_parameters must be"):
        load_ds_config(path, cfg, plan_batches(cfg, 2))


def test_zero2_gets_its_own_buckets():
    cfg = tiny_run_config(128)
    zero = load_ds_config(REPO / "ds_configs" / "zero2.json", cfg, plan_batches(cfg, 2))["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 128 * 128
    assert not any(key.startswith("stage3_") for key in zero)


@pytest.mark.parametrize("dense", [False, True], ids=["packed", "every-row"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_activation_estimate_matches_the_measured_forward_and_backward(checkpointing, dense):
    """torch's MemTracker counts every live tensor on CPU: the activations left at the end of the
    forward, and the peak of forward + backward over the parameters, for the packed strategy the
    trainer runs (`ponder.sparse_training`, nobody halting: the plan's worst case) and for the
    every-row one."""
    torch.manual_seed(0)
    config = AdaPonderConfig.from_preset(
        "tiny", hidden_size=128, intermediate_size=512, vocab_size=4096, num_hidden_layers=2
    )
    model = AdaPonderForCausalLM(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    tokens_BT1 = torch.randint(0, config.vocab_size, (2, 129))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        out = model(input_ids=tokens_BT1[:, :-1], labels=tokens_BT1[:, 1:], shift_labels=False, dense=dense)
        after_forward = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        out.loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    params = sum(p.numel() * 4 for p in model.parameters())
    kept, transient = activation_bytes(config, tokens=2 * 128, dtype_bytes=4, checkpointing=checkpointing)
    assert kept == pytest.approx(after_forward - params, rel=0.1)
    assert kept + transient == pytest.approx(peak - params, rel=0.1)
    # Checkpointing must matter, or the comparison above would not tell the two modes apart.
    assert activation_bytes(config, 256, 4, True)[0] < 0.6 * activation_bytes(config, 256, 4, False)[0]


def test_model_states_agree_with_deepspeeds_estimator():
    """DeepSpeed's estimator counts 18 bytes per parameter for mixed precision (ours: bf16 weights,
    gradients accumulated in fp32, fp32 master and Adam moments = 18) plus the largest layer in fp32."""
    cfg = read_config(
        None, ["model.preset=pythia-410m", "precision=bf16", "train_steps=1", "global_batch_size=8"]
    )
    plan = plan_batches(cfg, 8)
    memory = plan_memory(cfg.model_config(), cfg, 8, load_ds_config(ZERO3, cfg, plan))
    sizes = memory.sizes
    assert sizes.total == sum(p.numel() for p in _meta_model("pythia-410m").parameters())
    largest = max(sizes.layer, sizes.table)
    deepspeed_states = zero3_model_states_estimate(sizes.total, largest, 8) - 4 * largest
    ours = sum(memory.states.values())
    assert ours / deepspeed_states == pytest.approx(1.0, rel=0.01)


def _meta_model(preset: str) -> AdaPonderForCausalLM:
    with torch.device("meta"):
        return AdaPonderForCausalLM(AdaPonderConfig.from_preset(preset))


def test_planned_micro_batch_fits_and_the_next_does_not():
    cfg = read_config(
        None,
        [
            "model.preset=pythia-160m",
            "precision=bf16",
            "train_steps=1",
            "global_batch_size=8",
            "seq_len=2048",
        ],
    )
    plan = plan_batches(cfg, 8)
    memory = plan_memory(cfg.model_config(), cfg, 8, load_ds_config(ZERO3, cfg, plan))
    budget = 80 * 2**30
    for checkpointing in (True, False):
        best = memory.max_micro_batch(budget, checkpointing)
        assert best >= 1
        assert memory.peak(best, checkpointing) <= 0.9 * budget - 2**30 < memory.peak(best + 1, checkpointing)
    assert memory.max_micro_batch(budget, True) > memory.max_micro_batch(budget, False)


def test_dry_run_prints_the_plan_without_data(capsys):
    code = pretrain.main(
        [
            "--config",
            str(REPO / "configs" / "pythia-410m.yaml"),
            "--dry-run",
            "--world-size",
            "8",
            "--gpu-memory-gib",
            "80",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    recipe = read_config(REPO / "configs" / "pythia-410m.yaml")
    assert f"batch: {plan_batches(recipe, 8).describe()}" in out  # tokens per step and steps
    assert "parameters 417,941,507" in out
    for text in (
        "model states on the device",
        "DeepSpeed's estimate",
        "activations for 4 passes with checkpointing on",
        "activations for 4 passes with checkpointing off",
        "largest micro-batch in 80 GiB",
    ):
        assert text in out


def test_a_real_runs_backward_peak_is_planned(tmp_path, train_shards):
    """2 ranks, ZeRO-3, K=4, a model whose layers outweigh its vocabulary tables: the backward's
    measured peak (resident memory above the rank's baseline) lies within 15% of the plan, and holds
    the layers' full gradients that autograd sums over the K passes before ZeRO-3 can reduce them."""
    config = make_config(
        tmp_path,
        train_shards,
        "peak",
        model__overrides={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8},
        train_steps=2,
        seq_len=32,
        micro_batch_size=2,
        global_batch_size=4,
        activation_checkpointing=True,
        logging__eval_interval=0,
        checkpoint__interval=0,
    )
    # The launch sets glibc's mmap threshold itself (training.memory.host_allocator): nothing added here.
    assert "MALLOC_MMAP_THRESHOLD_" not in environment()
    result = subprocess.run(command(config), env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = read_config(config)
    memory = plan_memory(cfg.model_config(), cfg, 2, load_ds_config(ZERO3, cfg, plan_batches(cfg, 2)))
    planned = memory.phase_peaks(host=True)["backward"]
    layer_gradients = memory.shared_gradients * memory.dtype_bytes
    statuses = read_statuses(tmp_path / "peak")
    assert sorted(statuses) == [0, 1]
    for rank, record in statuses.items():
        measured = (record["breakdown"]["backward@2"]["peak_rss_gib"] - record["baseline_rss_gib"]) * 2**30
        assert planned == pytest.approx(measured, rel=0.15), (rank, planned / measured)
        # At least half of the layers' gradients shows beyond everything else the plan holds.
        assert measured - (planned - layer_gradients) > 0.5 * layer_gradients, (rank, measured, planned)


# Opt-in: a CPU-only clean-up check; every other 2-rank test runs the same collectives.
@pytest.mark.optin
def test_cpu_collectives_leave_no_shared_memory_behind(tmp_path, train_shards):
    """Under the `deepspeed` launcher every CPU rank maps a 66 MiB shared-memory workspace for
    DeepSpeed's collectives; the run must not leave it in /dev/shm after it ends."""
    config = make_config(
        tmp_path, train_shards, "shm", train_steps=1, logging__eval_interval=0, checkpoint__interval=0
    )
    argv = command(config, launcher="deepspeed")
    port = argv[argv.index("--master_port") + 1]
    result = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = read_statuses(tmp_path / "shm")
    # The workspaces were there: resident shared memory of a rank during the run.
    assert all(r["breakdown"]["forward@1"]["shmem_rss_gib"] > 0 for r in statuses.values()), statuses
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


# Opt-in: the first use of async_io in a new environment JIT-builds it (about 7 minutes on 2 busy
# cores), which alone would break the suite's time budget; libaio-dev is needed as well.
@pytest.mark.skipif(
    os.environ.get("ADAPONDER_TEST_NVME") != "1" or not nvme_offload_available(),
    reason="set ADAPONDER_TEST_NVME=1 to run (builds DeepSpeed's async_io op; needs libaio-dev)",
)
def test_nvme_offload_takes_a_step_and_swaps_what_is_planned(tmp_path, train_shards):
    """ZeRO-3 with parameters and optimizer offloaded to local disk (ds_configs/zero3_nvme.json), one
    rank, one step: the swap folder holds what the planner puts on NVMe (weights, fp32 master, Adam
    moments, and at most a gradient copy)."""
    config = make_config(
        tmp_path,
        train_shards,
        "nvme",
        model__overrides={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4},
        train_steps=1,
        micro_batch_size=2,
        global_batch_size=2,
        activation_checkpointing=True,
        deepspeed_config=str(REPO / "ds_configs" / "zero3_nvme.json"),
        logging__eval_interval=0,
        checkpoint__interval=0,
    )
    env = environment()  # the launch sets glibc's mmap threshold itself
    swap = tmp_path / "nvme" / "nvme-offload"
    result = subprocess.run(command(config, nproc=1), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = read_config(config)
    ds_config = load_ds_config(REPO / "ds_configs" / "zero3_nvme.json", cfg, plan_batches(cfg, 1))
    memory = plan_memory(cfg.model_config(), cfg, 1, ds_config)
    files = list(swap.rglob("*.swp"))

    def swapped(kind: str) -> int:
        return sum(p.stat().st_size for p in files if kind in p.name)

    planned = memory.nvme_states
    optimizer = sum(p.stat().st_size for p in files if p.parent.parent.name == "optimizer")
    optimizer -= swapped("_gradient_")
    assert optimizer == pytest.approx(planned["fp32 master"] + planned["Adam moments"], rel=0.01)
    # At 1.4b every weight and gradient was swapped (20 bytes per parameter in the folder); at this
    # size DeepSpeed keeps some of them in CPU memory, so the plan is their upper bound.
    assert 0 < swapped("_param.") <= planned["weights"]
    assert 0 < swapped("_gradient_") <= planned["gradients (swapped)"]
    assert "weights" not in memory.states and "Adam moments" not in memory.states


def test_peak_tflops_comes_from_the_device(monkeypatch):
    assert read_config(None, ["train_steps=1"]).logging.peak_tflops is None  # no config has to carry one
    assert metrics.detect_peak_tflops("bf16", 123.0).tflops == 123.0
    cpu = metrics.detect_peak_tflops("fp32")
    assert cpu.tflops > 0 and cpu.source.startswith("CPU estimate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, precision, expected in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.0),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert metrics.detect_peak_tflops(precision).tflops == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mystery Accelerator 9000")
    unknown = metrics.detect_peak_tflops("bf16")
    assert unknown.tflops is None and "logging.peak_tflops" in unknown.source


# Opt-in: tests/test_rank_watchdog.py names a dead rank on another host the same way.
@pytest.mark.optin
def test_a_killed_rank_is_named_by_the_survivor(tmp_path, train_shards):
    """SIGKILL (what the kernel's OOM killer sends) to rank 1 mid-training: rank 0 reports which rank
    died, the phase it was in and its peak memory, on stderr and in ranks/failure.txt."""
    config = make_config(
        tmp_path, train_shards, "killed", train_steps=400, logging__eval_interval=0, checkpoint__interval=0
    )
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        command(config), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        victim = _wait_for_step(run, rank=1, step=3, proc=proc)
        os.kill(victim["pid"], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode != 0
    failure = (run / "ranks" / "failure.txt").read_text()
    assert "[reported by rank 0" in failure
    for text in (failure, stderr):
        assert "rank 1 died (its process is gone" in text, text[-3000:]
        assert f"pid {victim['pid']}" in text
        assert "peak" in text and "GiB" in text
    described = failure.split("rank 1 died", 1)[1]
    assert any(f"was in {phase} of step" in described for phase in ("forward", "backward", "step"))


def _wait_for_step(run: Path, rank: int, step: int, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        record = read_statuses(run).get(rank)
        if (
            record
            and (record.get("step") or 0) >= step
            and record.get("phase") in ("forward", "backward", "step")
        ):
            return record
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not reach step {step}")


_MAIN_THREAD_IO: list | None = None  # while a list: file opens and renames of the main thread


def _audit_main_thread_io(event: str, args: tuple) -> None:
    if (
        _MAIN_THREAD_IO is not None
        and event in ("open", "os.rename")
        and threading.current_thread() is threading.main_thread()
    ):
        _MAIN_THREAD_IO.append((event, str(args[0])))


def _wait_for_status(run_dir: Path, **expected) -> dict:
    deadline = time.time() + 30  # generous: a loaded machine; the heartbeats below are 60 s or 0.05 s
    while time.time() < deadline:
        record = read_statuses(run_dir).get(0, {})
        if all(record.get(k) == v for k, v in expected.items()):
            return record
        time.sleep(0.01)
    raise AssertionError(f"status never showed {expected}: {record}")


def test_entering_a_phase_does_no_file_io_and_the_thread_writes_it(tmp_path, monkeypatch):
    """enter() on the training path only records the phase; the status thread writes the file (at
    once for phases outside the steady micro-batch loop, else at its heartbeat), and finish() writes
    the last phase itself."""
    global _MAIN_THREAD_IO
    writers = []
    write = rank_status._write_json

    def counted(path: Path, text: str) -> None:
        writers.append(threading.current_thread().name)
        write(path, text)

    monkeypatch.setattr(rank_status, "_write_json", counted)
    sys.addaudithook(_audit_main_thread_io)  # stays for the process; records only inside this test
    status = RankStatus(tmp_path, 0, 1, heartbeat_s=60.0, breakdown_steps=1)
    assert writers[0] == "MainThread"  # the launch itself, from the constructor
    for phase in ("forward", "backward", "step"):
        status.enter(phase, 1, 0)
    status.enter("forward", 2, 0)  # closes step 1's breakdown entry
    try:
        _MAIN_THREAD_IO = []
        for step in (2, 3):
            for phase in ("forward", "backward", "step") if step == 3 else ("backward", "step"):
                status.enter(phase, step, 0)
        assert _MAIN_THREAD_IO == []  # the steady state: no /proc, no status file
        status.enter("eval", 3)
        assert not any(str(tmp_path) in path for _, path in _MAIN_THREAD_IO)
    finally:
        _MAIN_THREAD_IO = None
    # No heartbeat within 60 s: only the wake-up of a notable phase writes it.
    _wait_for_status(tmp_path, phase="eval", step=3)
    assert set(writers[1:]) == {"rank-status"}
    status.enter("forward", 4, 0)
    status.enter("backward", 4, 0)
    status.finish(RuntimeError("out of memory"))
    record = read_statuses(tmp_path)[0]
    assert record["phase"] == "failed" and record["failed_in"] == {"phase": "backward", "step": 4, "micro": 0}
    assert set(record["breakdown"]) == {"init", "forward@1", "backward@1", "step@1"}

    beating = RankStatus(tmp_path / "beating", 0, 1, heartbeat_s=0.05, breakdown_steps=0)
    beating.enter("forward", 7, 1)  # notable: it ends "init"
    beating.enter("backward", 7, 1)  # routine: written by the next heartbeat
    _wait_for_status(tmp_path / "beating", phase="backward", step=7, micro=1)
    beating.finish()
    assert read_statuses(tmp_path / "beating")[0]["phase"] == "exited"
