"""The GPU acceptance check behind benchmarks/gpu_check.sh: PASS/FAIL lines with their ratios.

    benchmarks/gpu_check.sh            # one GPU, about 10 minutes
    benchmarks/gpu_check.sh --smoke    # CPU, tiny shapes, under a minute (tests/test_gpu_check.py)

Checks, in one process (one DeepSpeed rank):
  train     ZeRO-3 bf16 optimizer steps (ds_configs/zero3.json as the planner fills it) of the
            pythia-70m and pythia-410m shapes at K=4, dense and sparse (the same random exit passes:
            half the tokens stop before pass 4), measured peak memory against the plan's; sparse
            loss equal to dense, its step time as a ratio
  flash     the same sparse and dense training steps with SDPA restricted to flash attention
  export    the trained engine's checkpoint consolidated and written as a Hugging Face directory
            (training.export), loaded by transformers (trust_remote_code): the same logits as the
            consolidated model
  eval      the eval forward skipping halted tokens against dense: same logits, time ratio
  decode    K=1 greedy generation against transformers' GPTNeoXForCausalLM with the same weights:
            same tokens, time per token ratio
  speculate self-speculative greedy decoding (draft with pass 1): the same tokens as plain
            greedy decoding, speed-up (a model trained here for a few hundred steps, byte-level)
Random weights (no checkpoint is needed); timings are medians of a few repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

GIB = 2**30


class Report:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def line(self, ok: bool | None, name: str, detail: str) -> None:
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.passed += ok is True
        self.failed += ok is False
        print(f"{status} {name}: {detail}", flush=True)

    def run(self, name: str, check: Callable[[], tuple[bool | None, str]]) -> None:
        try:
            ok, detail = check()
        except Exception as e:  # a check that crashes is a FAIL with its reason, the others still run
            traceback.print_exc(file=sys.stderr)
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.line(ok, name, detail)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def init_one_rank() -> None:
    from training import distributed as dist
    from training import engine as ds

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    ds.init_distributed()


def flash_only(on: bool):
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


class TrainCase:
    """A ZeRO-3 engine of one preset and its batch; steps dense or sparse."""

    def __init__(self, preset: str, seq_len: int, micro_batch: int, overrides: list[str]):
        from model import AdaPonderForCausalLM
        from training import engine as ds
        from training.config import plan_batches, read_config, resolve_path
        from training.memory import plan_memory
        from training.optim import param_groups

        self.cfg = read_config(
            None,
            [
                f"model.preset={preset}",
                f"seq_len={seq_len}",
                f"micro_batch_size={micro_batch}",
                f"global_batch_size={micro_batch}",
                "train_steps=10",
                "precision=bf16",
                *overrides,
            ],
        )
        plan = plan_batches(self.cfg, 1)
        self.ds_config = ds.load_ds_config(resolve_path(self.cfg.deepspeed_config, "x"), self.cfg, plan)
        self.config = self.cfg.model_config()
        self.memory = plan_memory(self.config, self.cfg, 1, self.ds_config)
        self.device = ds.device()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = ds.build_model(lambda: AdaPonderForCausalLM(self.config), self.ds_config)
        self.engine = ds.Engine(model, param_groups(model, self.cfg.optimizer), self.ds_config)
        self.engine.train()
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.config.vocab_size, (micro_batch, seq_len + 1), generator=generator)
        self.ids = self.ids.to(self.device)
        # Half the tokens stop after a random pass 1-3, the rest run all 4: what sparse can skip.
        exits = torch.randint(1, self.config.num_passes, (micro_batch, seq_len), generator=generator)
        keep = torch.rand(micro_batch, seq_len, generator=generator) < 0.5
        self.exits = exits.masked_fill(keep, self.config.num_passes).to(self.device)

    def loss(self, sparse: bool) -> float:
        with torch.no_grad():
            return float(self.forward(sparse).lm_loss)

    def forward(self, sparse: bool):
        return self.engine(
            input_ids=self.ids[:, :-1],
            labels=self.ids[:, 1:],
            dense=not sparse,
            exit_passes=self.exits,
            ponder_lambda=0.1,
            ponder_k=0.1,
        )

    def step(self, sparse: bool) -> float:
        out = self.forward(sparse)
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.lm_loss)

    def peak(self) -> tuple[float | None, float]:
        measured = torch.cuda.max_memory_allocated() / GIB if self.device.type == "cuda" else None
        return measured, self.memory.peak() / GIB


def train_check(case: TrainCase, reps: int, flash: bool) -> tuple[bool, str]:
    """The loss of the same weights through the dense and the sparse path (bf16: 2% apart at most),
    then dense and sparse optimizer steps alternated and timed (the first pair is a warm-up)."""
    with flash_only(flash):
        loss = {sparse: case.loss(sparse) for sparse in (False, True)}
        losses, times = [], {True: [], False: []}
        for _ in range(reps):
            for sparse in (False, True):
                seconds = timed(lambda s=sparse: losses.append(case.step(s)), case.device)
                times[sparse].append(seconds)
    dense_s, sparse_s = statistics.median(times[False][1:]), statistics.median(times[True][1:])
    same = abs(loss[True] - loss[False]) <= 0.02 * abs(loss[False])
    finite = all(x == x and abs(x) < 1e4 for x in losses)
    measured, planned = case.peak()
    fits = measured is None or measured <= planned
    memory = "not measured on CPU" if measured is None else f"measured {measured:.2f} GiB"
    detail = (
        f"lm loss dense {loss[False]:.4f} sparse {loss[True]:.4f}; step dense {dense_s:.3f} s, "
        f"sparse {sparse_s:.3f} s (sparse / dense x{sparse_s / dense_s:.2f}); peak {memory}, planned "
        f"{planned:.2f} GiB" + (f" (measured / planned x{measured / planned:.2f})" if measured else "")
    )
    return same and finite and fits, detail


def export_check(case: TrainCase, tmp: Path) -> tuple[bool, str]:
    """Checkpoint the engine, consolidate its shards (training.engine) into a model, write that as a
    Hugging Face directory (training.export); transformers loads it and gives the model's logits."""
    from transformers import AutoModelForCausalLM

    from model import AdaPonderForCausalLM
    from training import engine as ds
    from training.export import _write_export

    case.engine.save(tmp / "checkpoints", "step", {})
    state = ds.consolidated_state_dict(tmp / "checkpoints", "step")
    with torch.device("meta"):
        model = AdaPonderForCausalLM(case.config)
    model.load_state_dict(state, strict=True, assign=True)
    (tmp / "hf").mkdir()
    _write_export(model, tmp / "hf", None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).to(case.device).eval()
    ids = case.ids[:1, :-1]
    with torch.no_grad():
        ours = model.to(case.device).eval()(ids).logits.float()
        theirs = loaded(ids).logits.float()
    diff = float((ours - theirs).abs().max())
    return diff <= 1e-4, f"{type(loaded).__name__} from the export, max |logit diff| {diff:.2e}"


def eval_check(preset: str, seq_len: int, batch: int, device: torch.device, dtype: torch.dtype, reps: int):
    from model import AdaPonderConfig, AdaPonderForCausalLM

    torch.manual_seed(0)
    model = AdaPonderForCausalLM(AdaPonderConfig.from_preset(preset)).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(device)
    exits = torch.randint(1, model.config.num_passes + 1, ids.shape, generator=generator).to(device)
    out = {}
    times = {True: [], False: []}
    with torch.no_grad():
        for _ in range(reps):
            for dense in (True, False):
                forward = lambda d=dense: out.__setitem__(d, model(ids, dense=d, exit_passes=exits))  # noqa: E731
                times[dense].append(timed(forward, device))
    diff = float((out[True].logits.float() - out[False].logits.float()).abs().max())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    dense_s, sparse_s = statistics.median(times[True]), statistics.median(times[False])
    passes = out[False].passes.float().mean()
    return diff <= tolerance, (
        f"{preset} {str(dtype).removeprefix('torch.')}, mean passes {passes:.2f} of 4: "
        f"max |logit diff| {diff:.2e}; dense {dense_s * 1e3:.1f} ms, sparse {sparse_s * 1e3:.1f} ms "
        f"(sparse / dense x{sparse_s / dense_s:.2f})"
    )


def decode_check(preset: str, new_tokens: int, device: torch.device, reps: int) -> tuple[bool, str]:
    """K=1 against transformers' GPT-NeoX with the same weights (fp32: the tokens must agree)."""
    from transformers import GPTNeoXForCausalLM

    from model import AdaPonderConfig, AdaPonderForCausalLM
    from model.hf_compat import gpt_neox_config

    torch.manual_seed(3)
    with tempfile.TemporaryDirectory() as tmp:
        GPTNeoXForCausalLM(gpt_neox_config(AdaPonderConfig.from_preset(preset))).save_pretrained(tmp)
        hf = GPTNeoXForCausalLM.from_pretrained(tmp).to(device).eval()
        ours = AdaPonderForCausalLM.from_pythia(tmp, num_passes=1).to(device).eval()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=generator).to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens, times = {}, {"hf": [], "ours": []}
    with torch.no_grad():
        for _ in range(reps):
            for name, model in (("hf", hf), ("ours", ours)):
                run = lambda m=model, n=name: tokens.__setitem__(n, m.generate(ids, **kwargs))  # noqa: E731
                times[name].append(timed(run, device) / new_tokens)
    same = torch.equal(tokens["hf"], tokens["ours"])
    hf_ms, ours_ms = statistics.median(times["hf"]) * 1e3, statistics.median(times["ours"]) * 1e3
    return same, (
        f"{preset} K=1, {new_tokens} greedy tokens {'identical' if same else 'DIFFER'}; transformers "
        f"{hf_ms:.2f} ms/token, ours {ours_ms:.2f} ms/token (ours / transformers x{ours_ms / hf_ms:.2f})"
    )


def speculate_check(train_steps: int, new_tokens: int, device: torch.device, reps: int) -> tuple[bool, str]:
    from bench_speculative import stdlib_text, train_tiny

    with contextlib.redirect_stdout(sys.stderr):
        model = train_tiny(train_steps).to(device)
    prompt = torch.tensor([list(stdlib_text(4_000).encode()[1000:1032])], dtype=torch.long).clamp(max=255)
    prompt = prompt.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    speculative = dict(assistant_early_exit=1, num_assistant_tokens=4)
    out, times = {}, {"plain": [], "speculative": []}
    with torch.no_grad():
        for _ in range(reps):
            for name, extra in (("plain", {}), ("speculative", speculative)):
                run = lambda n=name, e=extra: out.__setitem__(n, model.generate(prompt, **kwargs, **e))  # noqa: E731
                times[name].append(timed(run, device))
    same = torch.equal(out["plain"], out["speculative"])
    plain, spec = statistics.median(times["plain"]), statistics.median(times["speculative"])
    return same, (
        f"{new_tokens} greedy tokens {'identical' if same else 'DIFFER'} to plain decoding; speed-up "
        f"x{plain / spec:.2f} (drafting 4 tokens with pass 1, model trained {train_steps} steps)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (what the test suite runs)")
    args = parser.parse_args(argv)
    from training import engine as ds

    on_gpu = ds.on_accelerator()
    report = Report()
    if not on_gpu and not args.smoke:
        report.line(False, "device", "no GPU (DeepSpeed's accelerator is the CPU); --smoke checks on CPU")
        return 1
    if args.smoke:
        tiny = ["model.overrides.hidden_size=32", "model.overrides.intermediate_size=64"]
        train_cases = [("tiny", 32, 2, tiny)]
        eval_shape, decode_tokens, speculate = ("tiny", 32, 2), 8, (10, 16)
        reps = 2
    else:
        train_cases = [("pythia-70m", 2048, 4, []), ("pythia-410m", 2048, 2, [])]
        eval_shape, decode_tokens, speculate = ("pythia-410m", 2048, 4), 128, (600, 128)
        reps = 4
    init_one_rank()
    device = ds.device()
    report.line(True, "device", torch.cuda.get_device_name() if on_gpu else "CPU (smoke: tiny shapes)")
    last_case = None
    for preset, seq_len, micro, overrides in train_cases:
        case = TrainCase(preset, seq_len, micro, overrides)
        report.run(f"train {preset} K=4 ZeRO-3 bf16 dense+sparse", lambda c=case: train_check(c, reps, False))
        report.run(f"train {preset} K=4 flash attention only", lambda c=case: train_check(c, 2, True))
        last_case = case
    with tempfile.TemporaryDirectory() as tmp:
        report.run("export", lambda: export_check(last_case, Path(tmp)))
    dtype = torch.bfloat16 if on_gpu else torch.float32
    report.run("eval forward sparse vs dense", lambda: eval_check(*eval_shape, device, dtype, reps))
    decode_preset = "tiny" if args.smoke else "pythia-70m"
    decode = lambda: decode_check(decode_preset, decode_tokens, device, reps)  # noqa: E731
    report.run("decode step vs transformers", decode)
    report.run("self-speculative decoding", lambda: speculate_check(*speculate, device, reps))
    print(f"gpu_check: {report.passed} passed, {report.failed} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
