"""adaponder-prepare on pieces it is given here (no network): Pythia at a step, the pre-shuffled Pile."""

import json

import numpy as np
import pytest

from data.indexed import MMapIndexedDataset, write_index
from data.prepare import main

SAMPLE = 33  # seq_len 32 + 1: the pre-shuffled Pile's items are whole samples


def pile_pieces(root, count=3, samples=10):
    """A pre-shuffled-Pile-like index and its data cut into `count` pieces, as downloaded."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, samples * SAMPLE, dtype=np.uint16)
    root.mkdir()
    write_index(root / "document.idx", np.uint16, np.full(samples, SAMPLE), np.arange(samples + 1))
    data = tokens.tobytes()
    cuts = np.linspace(0, len(data), count + 1).astype(int) // 2 * 2
    for i in range(count):
        (root / f"document-{i:05d}-of-{count:05d}.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
    return tokens


def test_pile_pieces_are_joined_into_the_prefix_a_recipe_reads(tmp_path, capsys):
    tokens = pile_pieces(tmp_path / "download")
    out = tmp_path / "pile" / "document"
    assert main(["pile", "--pieces", str(tmp_path / "download"), "--output", str(out)]) == 0
    assert f"data.train_paths=[{out}]" in capsys.readouterr().out
    shard = MMapIndexedDataset(out)
    assert np.array_equal(np.concatenate([shard[i] for i in range(10)]), tokens)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_short_piece_is_named_and_nothing_written(tmp_path, capsys, damage):
    pile_pieces(tmp_path / "download")
    piece = tmp_path / "download" / "document-00001-of-00003.bin"
    if damage == "missing":
        piece.unlink()
    else:
        piece.write_bytes(piece.read_bytes()[:-10])
    out = tmp_path / "pile" / "document"
    assert main(["pile", "--pieces", str(tmp_path / "download"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        ("pieces of document missing: numbers [1]" in err)
        if damage == "missing"
        else ("document-00001-of-00003.bin" in err)
    )
    assert not (tmp_path / "pile").exists() or not any((tmp_path / "pile").iterdir())


def test_pythia_at_a_step_from_a_local_copy_or_the_hub_revision(tmp_path, capsys, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (copy / name).write_text(json.dumps({}))
    out = tmp_path / "pythia-70m"
    assert (
        main(["pythia", "--size", "70m", "--step", "100000", "--output", str(out), "--from", str(copy)]) == 0
    )
    assert f"model.init_from={out} data.start_after_pythia_step=100000" in capsys.readouterr().out

    asked = {}

    def fake_download(repo_id, revision, local_dir):
        asked.update(repo_id=repo_id, revision=revision)
        local_dir.mkdir()  # downloads nothing: the directory is then incomplete

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["pythia", "--size", "410m", "--step", "3000", "--output", str(tmp_path / "hub")]) == 2
    assert asked == {"repo_id": "EleutherAI/pythia-410m", "revision": "step3000"}
    assert "no config.json, tokenizer.json, weights" in capsys.readouterr().err
