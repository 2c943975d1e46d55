"""The study's report (experiments/report.py) from made-up per-run results of every arm and seed:
the verdicts it states, and its plots read back from the figures (what a reader sees)."""

import json

import pytest

from experiments import report
from experiments.arms import FULL, PASSES, arm_named, arms, jobs, run_name
from experiments.study import Layout

TAUS = FULL.taus


def _point(loss: float, passes: float, tokens: int = 1000) -> dict:
    share = [0.0] * PASSES
    share[min(PASSES, round(passes)) - 1] = 1.0
    return {
        "loss": loss,
        "mean_passes": passes,
        "flops_per_token": 1e5 * (0.2 + passes),
        "compute_vs_k1": 0.2 + passes,
        "nll_by_passes": [loss if s else None for s in share],
        "share_by_passes": share,
        "tokens": tokens,
    }


def _fixed(loss: float, passes: float, **setting) -> dict:
    return setting | {
        "target_mean_passes": passes,
        "draws": [_point(loss + 0.001 * d, passes) for d in range(3)],
    }


def fake_result(arm, seed: int, losses: dict[str, float]) -> dict:
    """A result in the study's format: `losses[arm]` on every shard, plus seed noise."""
    k = arm.model.get("num_passes", 1)
    loss = losses[arm.name] + 0.01 * seed
    passes = 3.0 if arm.adaptive else float(k)
    shards = {"code": _point(loss + 0.2, passes, 900), "programs": _point(loss - 1.8, passes, 100)}
    sweep = {"trained": _point(loss, passes)}
    curve = {"lm_loss": [[s, 5.0 - s / 1000] for s in range(0, 2001, 100)]}
    if arm.adaptive:
        for shard in shards.values():
            shard["forced_by_learned_depth"] = [
                {"passes": j, "share": 0.25, "nll_learned": loss + 0.1 * j, "nll_forced": loss + 0.08 * j}
                for j in range(1, PASSES + 1)
            ]
        sweep["learned"] = [
            _point(loss + 0.02 * i, passes - 0.5 * i) | {"tau": t} for i, t in enumerate(TAUS)
        ]
        sweep["fixed"] = [
            _fixed(p["loss"] + 0.05, p["mean_passes"], policy=policy, gate_scaling=scaling, tau=p["tau"])
            for p in sweep["learned"]
            for policy in ("uniform", "geometric")
            for scaling in (True, False)
        ]
        curve |= {
            f"gate_mean_{u}": [[s, 0.98 - s / 4000] for s in range(0, 2001, 100)] for u in range(PASSES - 1)
        }
    elif k > 1:
        sweep["fixed"] = [
            _fixed(loss + 0.1 * (k - m), m, policy=p)
            for m in FULL.pass_grid
            for p in ("uniform", "geometric")
        ]
        sweep["confidence"] = [_point(loss + 0.1 * c, k - c) | {"confidence": c} for c in FULL.confidences]
    return {
        "arm": arm.name,
        "seed": seed,
        "num_passes": k,
        "adaptive": arm.adaptive,
        "parameters": 165_632,
        "train_tokens": 4_096_000,
        "train_wall_seconds": 600.0,
        "trainer_eval": {"lm_loss": loss},
        "shards": shards,
        "sweep": sweep,
        "tasks": {"ponder_assert": {"acc": 0.5, "mean_passes": passes, "tokens": 10}},
        "training_curve": curve,
    }


LOSSES = {
    "vanilla": 3.0,
    "ponderlm-k2": 2.95,
    "ponderlm-k3": 2.92,
    "ponderlm": 2.90,
    "adaponder": 2.905,
    "ponderlm-more": 2.85,
    "adaponder-cont": 2.95,
    "vanilla-deep-lr1": 2.97,
    "vanilla-deep-lr0.5": 2.99,
    "vanilla-deep": 2.97,
    "ponderlm-pythia-init": 2.91,
}


@pytest.fixture
def study(tmp_path):
    layout = Layout(FULL, tmp_path / "work", tmp_path / "out")
    for arm, seed in jobs(FULL):
        path = layout.result_file(run_name(arm, seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fake_result(arm, seed, LOSSES)))
    return layout


def _claim(readme: str, start: str) -> str:
    claims = readme.split("## Which claims hold here")[1].split("###")[0]
    return next(line for line in claims.splitlines() if line.startswith(f"| {start}"))


def test_verdicts_read_the_paired_interval_and_the_declared_margin(study):
    readme = report.write_report(study).read_text()
    assert "PARTIAL" not in readme
    # Every seed's difference is the same, so the intervals are points.
    assert _claim(readme, "Pondering pays").endswith("| +0.1000 [+0.1000, +0.1000] (3 seeds) | holds |")
    assert "| same" not in readme
    assert _claim(readme, "AdaPonderLM from scratch").endswith("| holds (inside +-0.02) |")  # +0.005
    assert _claim(readme, "AdaPonderLM continued").endswith("| fails (outside +-0.02) |")  # +0.10
    assert _claim(readme, "K=4 over K=3").endswith("| holds |")
    # The deep vanilla's first seed is its tuning run with the lower final loss (lr x1).
    assert _claim(readme, "... more than").endswith("| +0.0700 [+0.0700, +0.0700] (3 seeds) | holds |")
    assert "learned better in 40 of 40 comparisons" in readme  # fixed pruning: +0.05 everywhere
    # The tau sweep at K=2's FLOPs (2 passes: its third point, loss + 0.04) against K=2's loss.
    assert _claim(readme, "AdaPonderLM's learned halting beats a trained PonderLM K=2").endswith(
        "| +0.0050 [+0.0050, +0.0050] (3 seeds) | holds |"
    )
    assert _claim(readme, "AdaPonderLM's learned halting beats a trained PonderLM K=3").endswith(
        "| +0.0150 [+0.0150, +0.0150] (3 seeds) | holds |"
    )
    assert "| adaponder | code | 4 | 25.0% |" in readme


def test_the_hard_token_claim_pools_the_earlier_exits_by_their_shares(study):
    """Forced NLL loss + 0.08 j at exit depth j: all-pass (j = 4) minus the share-weighted earlier
    exits. An exit depth no token took (share 0) counts for nothing."""
    for seed in FULL.seeds:
        path = study.result_file(run_name(arm_named(FULL, "adaponder"), seed))
        result = json.loads(path.read_text())
        cells = result["shards"]["code"]["forced_by_learned_depth"]
        cells[0]["share"], cells[1]["share"] = 0.0, 0.5  # earlier exits: j = 2 (0.5), j = 3 (0.25)
        path.write_text(json.dumps(result))
    claims = report.write_report(study).read_text().split("## Which claims hold here")[1].split("###")[0]
    hard = [line for line in claims.splitlines() if "are the hard ones" in line]
    assert len(hard) == 4  # both adaptive arms, both shards
    code = next(line for line in hard if "(adaponder, code)" in line)
    assert code.endswith("| +0.1333 [+0.1333, +0.1333] (3 seeds) | holds |")  # 0.08 (4 - 7 / 3)
    programs = next(line for line in hard if "(adaponder-cont, programs)" in line)
    assert programs.endswith("| +0.1600 [+0.1600, +0.1600] (3 seeds) | holds |")  # 0.08 (4 - 2)


def test_verdicts_with_spread_are_inconclusive_when_the_interval_crosses(study):
    path = study.result_file("adaponder-s2")
    result = json.loads(path.read_text())
    for shard in result["shards"].values():
        shard["loss"] += 0.2  # seeds now disagree: +0.005, +0.205, +0.005
    path.write_text(json.dumps(result))
    readme = report.write_report(study).read_text()
    assert _claim(readme, "AdaPonderLM from scratch").endswith("| inconclusive (crosses +-0.02) |")


def test_a_missing_run_makes_the_report_partial_and_is_named(study):
    study.result_file("ponderlm-k3-s2").unlink()
    readme = report.write_report(study).read_text()
    assert "**PARTIAL RESULTS: 1 of 26 runs" in readme
    assert "- ponderlm-k3-s2 (not started)" in readme
    assert _claim(readme, "K=4 over K=3").endswith("(2 seeds) | holds |")


def test_study_plots_have_titles_plain_labels_and_no_clipped_or_overlapping_text(
    study, saved_figures, text_problems
):
    report.write_report(study)
    assert set(saved_figures) == {"ppl_vs_compute.png", "nll_by_depth.png", "gates_in_training.png"}
    for name, fig in saved_figures.items():
        [ax] = fig.axes
        assert ax.get_title().strip() and ax.get_xlabel().strip() and ax.get_ylabel().strip(), name
        assert text_problems(fig) == [], name
    labels = saved_figures["ppl_vs_compute.png"].axes[0].get_legend_handles_labels()[1]
    # Every trained fixed-depth model, every adaptive sweep and every baseline is on the curve plot.
    for arm in arms(FULL):
        if not arm.adaptive and not arm.name.startswith("vanilla-deep-"):
            assert any(label.startswith(f"{arm.name} (K=") for label in labels), arm.name
    assert "adaponder: learned, tau sweep" in labels
    assert "adaponder-cont: geometric pruning, scaling neutralised" in labels
    assert "ponderlm-more: confidence exit" in labels
    # The gates plot marks the end of stage 1 and of the continued arm's gates-only phase.
    marks = {
        line.get_linestyle(): line.get_xdata()[0]
        for line in saved_figures["gates_in_training.png"].axes[0].get_lines()
        if len(set(line.get_xdata())) == 1
    }
    assert marks == {":": FULL.stage1, "--": arm_named(FULL, "adaponder-cont").ponder["gates_only"]}
