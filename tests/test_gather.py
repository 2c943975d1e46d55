"""Gather once, ponder K times: ZeRO-3 traffic of a K-pass step, measured and planned."""

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from training import engine as ds
from training.config import plan_batches, read_config, resolve_path
from training.memory import plan_memory, zero_buckets
from training.pretrain import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]


def _bench_gather():
    spec = importlib.util.spec_from_file_location("bench_gather", REPO / "benchmarks" / "bench_gather.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_k4_step_all_gathers_at_most_1_5x_the_bytes_of_a_k1_step():
    """Two CPU ranks, ZeRO-3 as planned, bytes counted through torch.distributed's collectives."""
    bench = _bench_gather()
    args = argparse.Namespace(preset="tiny", seq_len=16, micro_batch=1)
    results = bench.measure(args, ["k1", "k4"])
    for name, result in results.items():
        gathered = [rank["all_gather"] for rank in result["per_rank"]]
        assert gathered[0] == gathered[1] > 0, name
        # At least the weights of a forward and a backward; not a count of nothing.
        assert gathered[0] >= result["parameter_bytes"] * 0.5, name
    ratio = results["k4"]["per_rank"][0]["all_gather"] / results["k1"]["per_rank"][0]["all_gather"]
    assert ratio <= 1.5, bench.table(results)


def _plan(preset: str, passes: int, world: int = 16, micro: int = 1):
    cfg = read_config(
        None,
        [
            f"model.preset={preset}",
            f"model.overrides.num_passes={passes}",
            f"model.overrides.adaptive={passes > 1}",
            f"micro_batch_size={micro}",
            "global_batch_size=1024",
            "train_steps=1",
        ],
    )
    plan = plan_batches(cfg, world)
    ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    return plan, plan_memory(cfg.model_config(), cfg, world, ds_config)


def test_the_planner_keeps_weights_for_all_passes_and_counts_them():
    plan, k4 = _plan("pythia-410m", 4)
    _, k1 = _plan("pythia-410m", 1)
    zero = zero_buckets(k4.config, 3)
    assert zero["stage3_max_reuse_distance"] >= k4.sizes.total
    assert zero["stage3_max_live_parameters"] >= k4.sizes.total
    assert k4.gathers_once and not k1.gathers_once
    # Parameters offloaded (they do not fit): released after each use, as DeepSpeed would.
    assert zero_buckets(k4.config, 3, params_offloaded=True)["stage3_max_reuse_distance"] < k4.sizes.total
    # The whole model is gathered during the step: planned in the forward's peak.
    assert k4.gathered("forward") >= k4.sizes.total * k4.dtype_bytes
    steps = plan.gradient_accumulation_steps
    assert k4.communication(steps)["gathered"] <= 1.5 * k1.communication(steps)["gathered"]
    # Re-gathered every pass (the limits of one layer), the planner says so: K times the bytes.
    regather = dict(k4.zero, stage3_max_reuse_distance=k4.sizes.layer)
    _, k4_regather = _plan("pythia-410m", 4)
    k4_regather.zero = regather
    assert k4_regather.communication(steps)["gathered"] >= 3.5 * k1.communication(steps)["gathered"]


def test_dry_run_prints_communication_against_compute(capsys):
    code = pretrain_main(
        [
            "--dry-run",
            "--world-size",
            "16",
            "--link-gbs",
            "50",
            "model.preset=pythia-2.8b",
            "micro_batch_size=8",
            "global_batch_size=1024",
            "train_steps=10",
            "seq_len=2048",
            "logging.eval_samples=128",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    line = re.search(r"all-gathered ([\d.]+) GiB, reduced ([\d.]+) GiB", out)
    assert line, out
    # 2.8B bf16: every weight but the persistent small ones gathered twice per micro-batch, 8 of them.
    assert float(line[1]) == pytest.approx(2.85e9 * 2 * 2 * 8 / 2**30, rel=0.02)
    assert float(line[2]) == pytest.approx(2.85e9 * 2 * 8 / 2**30, rel=0.02)
    assert re.search(r"at 50 GB/s per rank .*: [\d.]+ s; compute [\d.]+ s at 400 TFLOP/s", out), out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("pythia-*.yaml")), ids=lambda p: p.name)
def test_recipes_take_their_micro_batch_from_the_plan(path):
    """The largest power of two dividing the per-rank batch whose planned peak fits 80 GB (79 GiB)."""
    text = path.read_text()
    world = int(re.search(r"^micro_batch_size: \d+ +# planned for (\d+) x 80 GB", text, re.M)[1])
    overrides = []
    if "continued" in path.name:  # plan from the preset's shape: the checkpoint is not on this machine
        overrides = ["model.init_from=null", f"model.preset={path.stem.removesuffix('-continued')}"]
    cfg = read_config(path, overrides)
    plan = plan_batches(cfg, world)
    ds_config = ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)
    memory = plan_memory(cfg.model_config(), cfg, world, ds_config)
    largest = memory.max_micro_batch(79 * 2**30)
    per_rank = cfg.global_batch_size // world
    expected = max(m for m in range(1, largest + 1) if per_rank % m == 0 and m & (m - 1) == 0)
    assert cfg.micro_batch_size == expected
