"""`adaponder-prepare`: lay out what the continued-pretraining recipes expect.

    adaponder-prepare pythia --size 70m --step 143000 --output checkpoints/pythia-70m
    adaponder-prepare pythia --size 70m --step 100000 --output DIR --from LOCAL_COPY   # no network
    adaponder-prepare pile --pieces DOWNLOAD_DIR --output data/pile-preshuffled/document

`pythia`: Pythia's weights, config and tokenizer at training step N (the Hub repository
EleutherAI/pythia-SIZE at revision stepN, or a local copy of it) in one Hugging Face directory: the
recipes' `model.init_from`; the run continues Pythia's data order with
`data.start_after_pythia_step=N`.

`pile`: EleutherAI/pile-standard-pythia-preshuffled ships one index (`document.idx`) and the data
in pieces (`document-00000-of-00020.bin` ...). They are checked (every piece present, the total
size the index describes) and joined into `OUTPUT.bin` beside `OUTPUT.idx`, the recipes'
`data.train_paths` prefix. Written under a temporary name and renamed, so OUTPUT is whole or absent.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from data.indexed import _HEADER, MMapIndexedDataset, data_path, index_path

PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_PIECE = re.compile(r"^(?P<name>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.bin$")
_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def expected_bin_bytes(idx: str | os.PathLike) -> int:
    """Bytes of the `.bin` an MMIDIDX index describes (last pointer + last size x itemsize)."""
    dtype, num_items, _ = MMapIndexedDataset._read_header(os.fspath(idx))
    if num_items == 0:
        return 0
    with open(idx, "rb") as f:
        f.seek(_HEADER.size + 4 * (num_items - 1))
        last_size = int(np.frombuffer(f.read(4), "<i4")[0])
        f.seek(_HEADER.size + 4 * num_items + 8 * (num_items - 1))
        last_pointer = int(np.frombuffer(f.read(8), "<i8")[0])
    return last_pointer + last_size * dtype.itemsize


def find_pieces(directory: Path) -> tuple[list[Path], Path]:
    """The `.bin` pieces in order and the index beside them; ValueError naming what is missing."""
    groups: dict[tuple[str, int], dict[int, Path]] = {}
    for path in directory.iterdir():
        match = _PIECE.match(path.name)
        if match:
            groups.setdefault((match["name"], int(match["n"])), {})[int(match["i"])] = path
    if len(groups) != 1:
        found = sorted(f"{name}-*-of-{n:05d}.bin" for name, n in groups) or "none"
        raise ValueError(
            f"{directory}: expected the pieces of one file (NAME-00000-of-000NN.bin), found {found}"
        )
    ((name, count), pieces) = groups.popitem()
    missing = [i for i in range(count) if i not in pieces]
    if missing:
        raise ValueError(
            f"{directory}: {len(missing)} of {count} pieces of {name} missing: numbers {missing}"
        )
    idx = directory / f"{name}.idx"
    if not idx.is_file():
        raise ValueError(f"{directory}: no {idx.name} beside the pieces (the index is downloaded whole)")
    return [pieces[i] for i in range(count)], idx


def join_pile(pieces_dir: str | os.PathLike, output: str | os.PathLike) -> dict:
    """Check and join the pieces into OUTPUT.bin / OUTPUT.idx; returns sizes for the report."""
    pieces, idx = find_pieces(Path(pieces_dir))
    expected = expected_bin_bytes(idx)
    total = sum(p.stat().st_size for p in pieces)
    if total != expected:
        sizes = ", ".join(f"{p.name} {p.stat().st_size:,}" for p in pieces)
        raise ValueError(
            f"{idx} describes {expected:,} bytes of data but the {len(pieces)} pieces hold {total:,} "
            f"({sizes}): a piece is truncated or from another file; download it again"
        )
    out_bin, out_idx = Path(data_path(output)), Path(index_path(output))
    out_bin.parent.mkdir(parents=True, exist_ok=True)
    partial = out_bin.with_name(out_bin.name + ".partial")
    with open(partial, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out, 16 * 2**20)
    shutil.copyfile(idx, out_idx)
    os.replace(partial, out_bin)
    MMapIndexedDataset(output)  # the pair opens: header, pointers, and size checked once more
    return {"pieces": len(pieces), "bytes": total, "output": os.fspath(output)}


def prepare_pythia(size: str, step: int, output: str | os.PathLike, source: str | None = None) -> Path:
    """Pythia-SIZE at training step `step` as a Hugging Face directory at `output`."""
    if size not in PYTHIA_SIZES:
        raise ValueError(f"--size {size}: expected one of {list(PYTHIA_SIZES)}")
    if not 0 <= step <= 143000:
        raise ValueError(f"--step {step}: Pythia's checkpoints are steps 0 ... 143000")
    output = Path(output)
    if source is not None:
        if Path(source).resolve() != output.resolve():
            shutil.copytree(source, output, dirs_exist_ok=True)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=f"EleutherAI/pythia-{size}", revision=f"step{step}", local_dir=output)
    missing = [name for name in ("config.json", "tokenizer.json") if not (output / name).is_file()]
    if not any((output / name).is_file() for name in _WEIGHTS):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        raise ValueError(f"{output}: no {', '.join(missing)}; not a Pythia checkpoint directory")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adaponder-prepare",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("    adaponder-prepare") : __doc__.index("`pythia`:")],
    )
    sub = parser.add_subparsers(dest="what", required=True)
    pythia = sub.add_parser("pythia", help="Pythia's weights and tokenizer at a training step")
    pythia.add_argument("--size", required=True, help=f"one of {', '.join(PYTHIA_SIZES)}")
    pythia.add_argument("--step", type=int, default=143000, help="training step (default: the last, 143000)")
    pythia.add_argument("--output", required=True, help="directory to write (the recipe's model.init_from)")
    pythia.add_argument("--from", dest="source", help="a local copy of the revision instead of the Hub")
    pile = sub.add_parser("pile", help="join the pre-shuffled Pile's downloaded pieces")
    pile.add_argument("--pieces", required=True, help="directory with NAME-000NN-of-000MM.bin and NAME.idx")
    pile.add_argument("--output", required=True, help="shard prefix to write (the recipe's data.train_paths)")
    args = parser.parse_args(argv)
    try:
        if args.what == "pythia":
            out = prepare_pythia(args.size, args.step, args.output, args.source)
            print(f"pythia-{args.size} at step {args.step} in {out}; continue it with")
            print(f"  model.init_from={out} data.start_after_pythia_step={args.step}")
        else:
            info = join_pile(args.pieces, args.output)
            print(f"joined {info['pieces']} pieces ({info['bytes']:,} bytes) into {info['output']}.bin/.idx;")
            print(f"  data.train_paths=[{info['output']}] data.sample_order=preshuffled")
    except (ValueError, OSError) as e:
        print(f"adaponder-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
