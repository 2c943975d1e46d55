"""The study's plots (experiments/report.py), drawn from the committed per-run results and read back
from the figures: what a reader sees."""

import copy

import pytest

from experiments import report
from experiments.arms import PASSES, SCALES
from experiments.study import EXPERIMENTS, Layout


@pytest.fixture(scope="module")
def study():
    layout = Layout(SCALES["full"], (EXPERIMENTS / "work" / "full").resolve(), EXPERIMENTS.resolve())
    by_arm = report.load_results(layout)
    assert any(by_arm.values()), f"the committed study results are missing from {layout.results}"
    return layout, by_arm


def test_nll_bars_only_at_pass_counts_some_token_ran(study, tmp_path, saved_figures):
    layout, by_arm = study
    arm = next(a.name for a in report.arms(layout.scale) if a.adaptive and by_arm[a.name])
    # No token of any seed of this arm ran exactly 3 passes.
    by_arm = copy.deepcopy(by_arm)
    for r in by_arm[arm]:
        learned = r["learned"]
        learned["share_by_passes"][3] += learned["share_by_passes"][2]
        learned["share_by_passes"][2] = 0.0
        learned["nll_by_passes"][2] = None
    report.plot_nll_by_passes(layout, by_arm, tmp_path / "nll_by_passes.png")
    [ax] = saved_figures["nll_by_passes.png"].axes
    assert not [line for line in ax.lines if len(line.get_xdata()) > 1], "no line joins pass counts"
    bars = {}
    for container in ax.containers:
        centres = {round(b.get_x() + b.get_width() / 2) for b in container if b.get_height() > 0}
        bars[container.get_label()] = centres
    assert bars[arm] == {1, 2, 4}
    assert all(centres <= set(range(1, PASSES + 1)) for centres in bars.values())
    texts = [t.get_text() for t in ax.texts]
    assert "0%" not in texts, "a handful of tokens reads '<1%', not '0%'"


def test_study_plots_have_titles_plain_labels_and_no_clipped_or_overlapping_text(
    study, tmp_path, saved_figures, text_problems
):
    layout, by_arm = study
    report.plot_compute(layout, by_arm, tmp_path / "ppl_vs_compute.png")
    report.plot_nll_by_passes(layout, by_arm, tmp_path / "nll_by_passes.png")
    report.plot_training_passes(layout, by_arm, tmp_path / "training_passes.png")
    assert len(saved_figures) == 3
    for name, fig in saved_figures.items():
        [ax] = fig.axes
        assert ax.get_title().strip() and ax.get_xlabel().strip(), name
        assert ax.get_ylabel().strip(), name
        assert text_problems(fig) == [], name
    assert saved_figures["nll_by_passes.png"].axes[0].get_ylabel() == "mean NLL (nats per token)"
