"""Shared test setup: CPU only, fp32, quiet Hugging Face logging."""

import os
import sys
from pathlib import Path

import pytest

# experiments/ is a directory of the repository, not an installed package: the study's tests import it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread per process (tests' subprocesses inherit it): the tests' models are tiny, and
# two OpenMP threads on a 2-core machine that is busy with anything else spin at their barriers:
# tests/test_speculative.py's greedy test took 45 s instead of 0.7 s that way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --- the opt-in tier: the default suite stays under 15 minutes on 2 cores ---------------------------


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ADAPONDER_ALL_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: set ADAPONDER_ALL_TESTS=1 to run it")
    for item in items:
        if "optin" in item.keywords:
            item.add_marker(skip)


# --- training tests: a small tokenized slice of real text, built once per session ---------------


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """~1 MB of the Python standard library's sources, a 512-token byte-level BPE tokenizer trained on
    it, and its MMIDIDX shards. Returns (shard prefix, tokenizer directory) as strings."""
    from data.builtin_corpus import build_builtin_corpus
    from data.preprocess import preprocess
    from data.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_shards")
    corpus = root / "stdlib.jsonl"
    build_builtin_corpus(str(corpus), max_bytes=1_000_000)
    tokenizer = train_tokenizer([str(corpus)], "bpe", 512, str(root / "tokenizer"))
    prefix = root / "stdlib_text_document"
    preprocess([str(corpus)], str(tokenizer), str(prefix), progress=False)
    return str(prefix), str(tokenizer)


# --- plots: what a figure shows, read back from the figure itself ---------------------------------


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: figure} of every matplotlib figure saved while the test runs (still saved to disk)."""
    from pathlib import Path

    from matplotlib.figure import Figure

    saved, real = {}, Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(fname).name] = self
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _text_problems(fig) -> list[str]:
    """Texts of `fig` cut off by its edge, and texts or legends that overlap one another, where the
    saved picture draws them: titles, axis labels, the tick labels drawn, annotations, legends."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # a closed figure keeps no canvas of its own
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = list(fig.texts)
    boxes = [leg.get_window_extent(renderer) for leg in fig.legends]
    names = [f"figure legend {i}" for i in range(len(fig.legends))]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts += [tick.label1 for tick in axis._update_ticks() if tick.label1.get_visible()]
        if ax.get_legend() is not None:
            boxes.append(ax.get_legend().get_window_extent(renderer))
            names.append(f"legend of {ax.get_title()!r}")
    for text in texts:
        if text.get_visible() and text.get_text().strip():
            boxes.append(text.get_window_extent(renderer))
            names.append(repr(text.get_text()))
    page = fig.bbox
    problems = [
        f"{name} is cut off by the figure's edge"
        for name, box in zip(names, boxes)
        if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1
    ]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if boxes[i].overlaps(boxes[j]):
                problems.append(f"{names[i]} overlaps {names[j]}")
    return problems


@pytest.fixture
def text_problems():
    return _text_problems
