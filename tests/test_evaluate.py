"""`adaponder-eval` on a model trained here through the real trainer (2 steps, 1 rank, ZeRO-3), read
from its run directory and from its export, checked against direct per-window computations."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_config, run_dir, train

from data.dataset import split_range
from data.indexed import MMapIndexedDataset
from model import AdaPonderConfig, AdaPonderForCausalLM
from training.evaluate import (
    EXIT_DISTRIBUTIONS,
    document_windows,
    load_model,
    load_tokenizer,
    main,
    share_label,
    stratified_exits,
    write_report,
)
from training.export import export_checkpoint

SPLIT = "90,10,0"
SEQ_LEN = 32
WINDOWS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_shards):
    """(run directory, its export, shard prefix, two taus that halt part of the tokens after pass 1)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    config = make_config(
        tmp, train_shards, "run", train_steps=2, checkpoint__interval=2, logging__eval_interval=2
    )
    train(config, nproc=1)
    run = run_dir(config)
    export = tmp / "export"
    export_checkpoint(run, export)
    # Two steps leave the gates near their initial value, far above the trained tau: the sweep's
    # taus are quantiles of the first gate on the held-out windows, so tokens halt in between.
    model, _, _ = load_model(run)
    windows, _ = document_windows(train_shards[0], SEQ_LEN, SPLIT, "valid", WINDOWS)
    with torch.no_grad():
        gates = torch.cat([model(torch.from_numpy(w[:-1])[None], dense=True).gates[0, 0] for w in windows])
    taus = [float(torch.quantile(gates, q)) for q in (0.3, 0.7)]
    return run, export, train_shards[0], taus


def evaluate(model_dir, output, *args) -> dict:
    assert main([str(model_dir), "--output", str(output), "--no-progress", *args]) == 0
    return json.loads((output / "eval.json").read_text())


def data_args(prefix: str) -> list[str]:
    common = ["--seq-len", str(SEQ_LEN), "--max-windows", str(WINDOWS), "--batch-size", "5"]
    return ["--data", prefix, "--split", SPLIT, "--split-name", "valid", *common]


def direct(model: AdaPonderForCausalLM, windows, tau: float) -> dict:
    """One window at a time, no padding, dense forward: what eval.json must report at tau."""
    k = model.config.num_passes
    k1_model = AdaPonderForCausalLM(AdaPonderConfig(**{**model.config.to_dict(), "num_passes": 1}))
    nll, passes, flops, dense, flops_k1 = [], [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for w in windows:
            ids, targets = torch.from_numpy(w[:-1])[None], torch.from_numpy(w[1:])[None]
            out = model(ids, labels=targets, shift_labels=False, dense=True, halt_threshold=tau)
            nll.append(out.token_nll[0])
            passes.append(out.passes[0])
            flops, dense = flops + float(out.flops["total"]), dense + float(out.flops["dense_total"])
            flops_k1 += float(k1_model(ids).flops["total"])
    nll, passes = torch.cat(nll).double(), torch.cat(passes)
    by_passes = [
        {"passes": j, "fraction": float((passes == j).double().mean()), "nll": float(nll[passes == j].mean())}
        for j in range(1, k + 1)
        if (passes == j).any()
    ]
    return {
        "nll": float(nll.mean()),
        "ppl": math.exp(float(nll.mean())),
        "mean_passes": float(passes.double().mean()),
        "tokens": len(nll),
        "flops_per_token": flops / len(nll),
        "compute_vs_k1": flops / flops_k1,
        "compute_vs_dense": flops / dense,
        "nll_by_passes": by_passes,
    }


def assert_point_matches(point: dict, expected: dict) -> None:
    for name in ("nll", "ppl", "mean_passes", "flops_per_token", "compute_vs_k1", "compute_vs_dense"):
        assert point[name] == pytest.approx(expected[name], rel=1e-5), name
    assert point["tokens"] == expected["tokens"]
    assert [r["passes"] for r in point["nll_by_passes"]] == [r["passes"] for r in expected["nll_by_passes"]]
    for got, want in zip(point["nll_by_passes"], expected["nll_by_passes"]):
        assert got["fraction"] == pytest.approx(want["fraction"], rel=1e-9)
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_windows_cover_every_document_of_the_split_once(train_shards):
    prefix = train_shards[0]
    windows, described = document_windows(prefix, SEQ_LEN, SPLIT, "valid")
    shard = MMapIndexedDataset(prefix)
    documents = split_range(len(shard), [0.9, 0.1, 0.0], 1)
    assert described["documents"] == [documents.start, documents.stop]
    targets = np.concatenate([w[1:] for w in windows])
    expected = np.concatenate([shard[d][1:] for d in documents]).astype(np.int64)
    np.testing.assert_array_equal(targets, expected)
    assert max(len(w) for w in windows) == SEQ_LEN + 1
    assert described["tokens"] == len(expected)


def test_perplexity_passes_compute_and_nll_by_passes_match_a_direct_computation(trained, tmp_path):
    run, _, prefix, taus = trained
    report = evaluate(run, tmp_path, *data_args(prefix), "--sweep-threshold", str(taus[1]))
    model, _, _ = load_model(run)
    windows, described = document_windows(prefix, SEQ_LEN, SPLIT, "valid", WINDOWS)
    assert report["data"] == json.loads(json.dumps(described))
    assert report["model"]["checkpoint"] == "step-00000002"
    trained_point, swept = report["points"]
    assert (trained_point["policy"], trained_point["halt_threshold"]) == (
        "learned",
        model.config.halt_threshold,
    )
    assert_point_matches(trained_point, direct(model, windows, model.config.halt_threshold))
    assert (swept["policy"], swept["halt_threshold"]) == ("learned", taus[1])
    expected = direct(model, windows, taus[1])
    assert_point_matches(swept, expected)
    # The swept tau halts part of the tokens after pass 1, which is what makes this check non-trivial.
    assert 1 < expected["mean_passes"] < model.config.num_passes and len(expected["nll_by_passes"]) > 1
    assert swept["compute_vs_dense"] < 1.0 < swept["compute_vs_k1"]
    assert_png(tmp_path / "quality_vs_compute.png")
    assert_png(tmp_path / "nll_by_passes.png")


def test_run_directory_and_its_export_give_the_same_numbers(trained, tmp_path):
    run, export, prefix, taus = trained
    from_run = evaluate(run, tmp_path / "run", *data_args(prefix), "--sweep-threshold", str(taus[0]))
    from_export = evaluate(export, tmp_path / "export", *data_args(prefix), "--sweep-threshold", str(taus[0]))
    assert from_run["points"] == from_export["points"]
    assert from_run["data"] == from_export["data"]
    assert from_run["model"]["parameters"] == from_export["model"]["parameters"]


def test_sweep_has_one_point_per_setting_and_fixed_pruning_at_the_learned_mean_passes(trained, tmp_path):
    run, _, prefix, taus = trained
    sweep = ",".join(str(t) for t in taus)
    policies = ["--policies", "uniform,geometric"]
    report = evaluate(
        run, tmp_path, *data_args(prefix), "--sweep-threshold", sweep, "--sweep-max-passes", "1,2", *policies
    )
    k, trained_tau = report["model"]["num_passes"], report["model"]["halt_threshold"]
    learned = [p for p in report["points"] if p["policy"] == "learned"]
    settings = [(p["halt_threshold"], p["max_passes"]) for p in learned]
    assert settings == [
        (trained_tau, None),
        (taus[0], None),
        (taus[1], None),
        (trained_tau, 1),
        (trained_tau, 2),
    ]
    means = [p["mean_passes"] for p in learned]
    assert means[0] > means[1] > means[2], "a higher tau halts more tokens"
    assert means[3] == 1.0 and means[4] == 2.0, "the trained tau halts nobody here: the cap decides"
    tokens = learned[0]["tokens"]
    for policy in ("uniform", "geometric"):
        fixed = [p for p in report["points"] if p["policy"] == policy]
        assert len(fixed) == len(learned)
        for point, target in zip(fixed, learned):
            assert point["target_mean_passes"] == target["mean_passes"]
            assert abs(point["mean_passes"] - target["mean_passes"]) <= k / tokens
            assert point["tokens"] == tokens and point["halt_threshold"] is None
        # Fixed pruning below all K passes uses several exit depths, the learned pattern aside.
        assert len(fixed[2]["nll_by_passes"]) > 1
    assert_png(tmp_path / "quality_vs_compute.png")


@pytest.mark.parametrize("k", [2, 4, 8])
def test_exit_distributions_have_the_asked_mean(k):
    rng = np.random.default_rng(0)
    for mean in np.linspace(1.0, k, 9):
        for name, distribution in EXIT_DISTRIBUTIONS.items():
            probs = distribution(mean, k)
            assert probs.min() >= 0 and probs.sum() == pytest.approx(1.0), name
            assert (probs * np.arange(1, k + 1)).sum() == pytest.approx(mean, abs=1e-9), (name, mean)
            exits = stratified_exits(probs, 1001, rng)
            assert exits.min() >= 1 and exits.max() <= k and len(exits) == 1001
            assert abs(exits.mean() - mean) <= k / 1001


TASK_ROWS = [
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "None", "import os"], "label": 0},
    {"context": "for i in range(10):\n   ", "choices": ["print(i)", "class Foo", "))"], "label": 0},
    {"context": "import", "choices": ["os.path", "1234", "]]"], "label": 0},
    {"context": "if x is None:\n    raise", "choices": ["ValueError", "for x", "0.5"], "label": 0},
]


def local_tasks(directory: Path) -> None:
    """Two lm-eval tasks defined by a jsonl file and YAML files, nothing from the hub: multiple
    choice (loglikelihood) and greedy generation."""
    directory.mkdir()
    (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'rows.jsonl'}\n"
        'test_split: test\ndoc_to_text: "{{context}}"\n'
    )
    (directory / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "tiny_generate.yaml").write_text(
        f"task: tiny_generate\n{common}output_type: generate_until\n"
        'doc_to_target: "{{choices[0]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_local_lm_eval_task_reports_its_metric_passes_and_compute(trained, tmp_path):
    _, export, _, taus = trained
    local_tasks(tmp_path / "tasks")
    args = ["--tasks", "tiny_choice", "--include-path", str(tmp_path / "tasks"), "--batch-size", "4"]
    report = evaluate(
        export, tmp_path / "out", *args, "--sweep-threshold", str(taus[1]), "--policies", "uniform"
    )
    entries = report["tasks"]["tiny_choice"]
    assert [(e["policy"], e["halt_threshold"]) for e in entries] == [
        ("learned", report["model"]["halt_threshold"]),
        ("learned", taus[1]),
        ("uniform", None),
        ("uniform", None),
    ]
    assert report["points"] == []
    # Direct: every (context, " " + choice) request scored alone, at the swept tau.
    model, _, _ = load_model(export)
    tokenizer = load_tokenizer(str(export))
    passes = []
    with torch.no_grad():
        for row in TASK_ROWS:
            for choice in row["choices"]:
                ids = tokenizer(row["context"] + " " + choice)["input_ids"][:-1]
                passes.append(model(torch.tensor([ids]), halt_threshold=taus[1]).passes[0])
    passes = torch.cat(passes).double()
    for entry in entries:
        assert 0.0 <= entry["metrics"]["acc,none"] <= 1.0
        assert entry["tokens"] == len(passes)
    assert entries[0]["mean_passes"] == report["model"]["num_passes"]
    assert entries[1]["mean_passes"] == pytest.approx(float(passes.mean()), rel=1e-9)
    assert entries[1]["compute_vs_dense"] < 1.0 < entries[1]["compute_vs_k1"]
    assert entries[3]["target_mean_passes"] == entries[1]["mean_passes"]
    assert abs(entries[3]["mean_passes"] - entries[1]["mean_passes"]) < 0.5  # drawn, not stratified
    assert_png(tmp_path / "out" / "quality_vs_compute.png")


def test_user_errors_name_the_argument(trained, tmp_path, capsys):
    run, export, prefix, _ = trained
    assert main([str(export), "--output", str(tmp_path), "--tag", "step-00000002", "--data", prefix]) == 2
    assert "--tag" in capsys.readouterr().err
    assert main([str(run), "--output", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([str(run), "--output", str(tmp_path), "--data", prefix, "--policies", "random"]) == 2
    assert "--policies" in capsys.readouterr().err
    assert main([str(run), "--output", str(tmp_path), "--data", prefix, "--sweep-max-passes", "9"]) == 2
    assert "--sweep-max-passes" in capsys.readouterr().err


def test_local_generation_task_counts_the_generated_tokens_passes(trained, tmp_path):
    _, export, _, taus = trained
    local_tasks(tmp_path / "tasks")
    args = ["--tasks", "tiny_generate", "--include-path", str(tmp_path / "tasks"), "--batch-size", "4"]
    report = evaluate(export, tmp_path / "out", *args, "--sweep-threshold", str(taus[1]))
    trained_entry, swept = report["tasks"]["tiny_generate"]
    assert "exact_match,none" in swept["metrics"]
    k = report["model"]["num_passes"]
    # Prompts plus at least one generated token each, every token counted once.
    prompts = sum(len(load_tokenizer(str(export))(r["context"])["input_ids"]) for r in TASK_ROWS)
    assert trained_entry["tokens"] > prompts and swept["tokens"] > prompts
    assert trained_entry["mean_passes"] == k
    assert 1 < swept["mean_passes"] < k and swept["compute_vs_dense"] < 1


# --- the plots, read back from the figures (synthetic reports: no model needed) ---------------------


def synthetic_point(policy, tau, mean_passes, ppl, by_passes, cap=None):
    return {
        "policy": policy,
        "halt_threshold": tau,
        "max_passes": cap,
        "nll": math.log(ppl),
        "ppl": ppl,
        "mean_passes": mean_passes,
        "tokens": 1000,
        "flops_per_token": mean_passes,
        "compute_vs_k1": mean_passes,
        "compute_vs_dense": mean_passes / 4,
        "nll_by_passes": [{"passes": j, "fraction": f, "nll": n} for j, (f, n) in by_passes.items()],
    }


def synthetic_report(path="/data/users/someone/runs/quickstart/hf"):
    """The quickstart's evaluation in shape: the trained tau and four more, fixed pruning at each; at
    most taus some pass counts are run by no token, and some by a handful (a share under 1%)."""
    learned = [
        synthetic_point("learned", 1e-4, 3.64, 197.4, {1: (0.12, 3.91), 4: (0.88, 5.47)}),
        synthetic_point("learned", 1e-3, 3.16, 197.5, {1: (0.28, 4.5), 4: (0.72, 5.55)}),
        synthetic_point("learned", 1e-2, 2.57, 197.8, {1: (0.474, 4.88), 2: (0.004, 5.5), 4: (0.522, 5.66)}),
        synthetic_point(
            "learned", 5e-2, 1.79, 198.7, {1: (0.7, 5.1), 2: (0.05, 5.0), 3: (0.002, 5.3), 4: (0.248, 5.9)}
        ),
        synthetic_point("learned", 0.2, 1.27, 199.5, {1: (0.857, 5.26), 2: (0.079, 5.01), 4: (0.064, 6.08)}),
        synthetic_point("learned", 1e-4, 2.0, 199.0, {1: (0.12, 3.9), 2: (0.88, 5.6)}, cap=2),
    ]
    fixed = [
        synthetic_point(
            policy, None, p["mean_passes"], p["ppl"] + 0.5 + 0.1 * i, {1: (0.5, 5.3), 4: (0.5, 5.3)}
        )
        for i, policy in enumerate(("uniform", "geometric"))
        for p in learned
    ]
    model = {"path": path, "checkpoint": None, "step": None, "num_passes": 4, "adaptive": True}
    model |= {"halt_threshold": 1e-4, "max_passes": None, "parameters": 1_512_000}
    return {"model": model, "data": {}, "points": learned + fixed, "tasks": {}}


def test_nll_plot_has_no_line_or_bar_at_a_pass_count_no_token_ran(tmp_path, saved_figures):
    report = synthetic_report()
    write_report(report, tmp_path)
    fig = saved_figures["nll_by_passes.png"]
    learned = [p for p in report["points"] if p["policy"] == "learned"]
    # A line between pass counts would claim values at the counts in between.
    assert not [line for ax in fig.axes for line in ax.lines if len(line.get_xdata()) > 1]
    axes = [ax for ax in fig.axes if ax.patches]
    assert len(axes) == len(learned), "one panel per learned setting"
    for ax, point in zip(axes, learned):
        used = {r["passes"] for r in point["nll_by_passes"]}
        bars = {round(bar.get_x() + bar.get_width() / 2) for bar in ax.patches if bar.get_height() > 0}
        assert bars == used, (point["halt_threshold"], bars, used)
        labels = sorted(t.get_text() for t in ax.texts)
        assert labels == sorted(share_label(r["fraction"]) for r in point["nll_by_passes"])
    assert "<1%" in [t.get_text() for ax in axes for t in ax.texts], "a handful of tokens is not '0%'"
    ylabels = {ax.get_ylabel() for ax in fig.axes} - {""}
    assert ylabels == {"mean NLL (nats per token)"}


def test_plots_have_a_title_naming_no_path_and_no_clipped_or_overlapping_text(
    tmp_path, saved_figures, text_problems
):
    report = synthetic_report()
    write_report(report, tmp_path)
    assert set(saved_figures) == {"quality_vs_compute.png", "nll_by_passes.png"}
    for name, fig in saved_figures.items():
        title = fig._suptitle.get_text() if fig._suptitle else ""
        assert title.strip(), name
        texts = [title] + [t.get_text() for ax in fig.axes for t in (ax.title, *ax.texts)]
        assert not [t for t in texts if "/" in t or "quickstart" in t], (name, texts)
        assert text_problems(fig) == [], name


def test_quality_plot_is_a_curve_per_policy_with_each_tau_named(tmp_path, saved_figures):
    report = synthetic_report()
    write_report(report, tmp_path)
    [ax] = saved_figures["quality_vs_compute.png"].axes
    curves = {line.get_label(): line for line in ax.lines}
    swept = curves["learned halting, tau swept"]
    assert list(swept.get_xdata()) == sorted(p["mean_passes"] for p in report["points"][:5])
    assert {"fixed pruning, uniform exits", "fixed pruning, geometric exits"} <= set(curves)
    assert {t.get_text() for t in ax.texts} >= {"tau 0.0001", "tau 0.001", "tau 0.01", "tau 0.05", "tau 0.2"}


def test_a_single_setting_or_tasks_without_data_write_no_empty_or_one_dot_plot(tmp_path):
    report = synthetic_report()
    tasks_only = report | {
        "points": [],
        "tasks": {"tiny_choice": [report["points"][0] | {"metrics": {"acc,none": 0.5}}]},
    }
    # A plot left by an earlier evaluation in the same directory would describe another eval.json.
    (tmp_path / "nll_by_passes.png").write_bytes(b"an earlier plot")
    written = write_report(tasks_only, tmp_path)
    assert not (tmp_path / "nll_by_passes.png").exists() and "--data" in written["nll"]
    assert not (tmp_path / "quality_vs_compute.png").exists() and "--sweep-threshold" in written["quality"]
    assert written["json"] == tmp_path / "eval.json"
    one = write_report(report | {"points": report["points"][:1]}, tmp_path / "one")
    assert not (tmp_path / "one" / "quality_vs_compute.png").exists() and isinstance(one["quality"], str)
    assert_png(tmp_path / "one" / "nll_by_passes.png")
