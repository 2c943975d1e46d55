"""Tokenizers, adaponder-preprocess and a real text corpus end to end."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataConfig, build_datasets
from data.builtin_corpus import build_builtin_corpus, write_source_jsonl
from data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder
from data.loader import build_dataloader
from data.preprocess import main, preprocess
from data.sampler import PretrainingSampler
from data.tokenizer import load_tokenizer
from data.train_tokenizer import main as train_tokenizer_main
from data.train_tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    build_builtin_corpus(str(path), max_bytes=400_000)
    return path


@pytest.fixture(scope="module")
def corpus_texts(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    return train_tokenizer([str(corpus)], "bpe", 500, str(tmp_path_factory.mktemp("bpe")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_corpus_is_deterministic_and_capped(corpus, corpus_texts, tmp_path):
    again = tmp_path / "again.jsonl"
    assert build_builtin_corpus(str(again), max_bytes=400_000) == len(corpus_texts)
    assert again.read_bytes() == corpus.read_bytes()
    assert 10 < len(corpus_texts) and os.path.getsize(corpus) <= 400_000
    assert all(t.strip() for t in corpus_texts)
    assert not any("import unittest" in t and "class Test" in t for t in corpus_texts)  # no test modules


def test_source_jsonl_bytes_are_stable(tmp_path):
    """The exact bytes of the jsonl writer: corpora written before (the study's) must stay valid."""
    contents = {
        "a.py": 'print("\u00e9")\n'.encode(),
        "blank.py": b" \n",
        "latin1.py": b"x = '\xff'\n",
        "big.py": b"y" * 100,
        "c.py": b"z\n",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    sources = [tmp_path / name for name in contents]
    a = b'{"text": "print(\\"\xc3\xa9\\")\\n"}\n'
    latin1 = b'{"text": "x = \'\xef\xbf\xbd\'\\n"}\n'
    c = b'{"text": "z\\n"}\n'
    budget = len(a + latin1 + c)  # big.py's line does not fit; c.py's fits exactly
    stop, skip = tmp_path / "out" / "stop.jsonl", tmp_path / "out" / "skip.jsonl"
    assert write_source_jsonl(sources, stop, budget, skip_oversized=False) == {"documents": 2, "bytes": 52}
    assert stop.read_bytes() == a + latin1
    assert write_source_jsonl(sources, skip, budget, skip_oversized=True) == {"documents": 3, "bytes": 68}
    assert skip.read_bytes() == a + latin1 + c
    assert sorted(p.name for p in skip.parent.iterdir()) == ["skip.jsonl", "stop.jsonl"]  # no temporary left


def test_bpe_tokenizer_is_a_byte_level_hf_directory(bpe_dir):
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(bpe_dir))
    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert hf.convert_tokens_to_ids("<|endoftext|>") == 0 and hf.eos_token_id == 0
    ours = load_tokenizer(bpe_dir)
    assert ours.eod_id == 0 and ours.vocab_size == 500
    text = "naïve café — 東京 🚀\n\tdef f(): return 1"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert load_tokenizer(bpe_dir / "tokenizer.json").encode(text) == ids


def test_sentencepiece_tokenizer(tmp_path, corpus):
    train_tokenizer_main(
        ["--input", str(corpus), "--type", "sentencepiece", "--vocab-size", "400", "--output", str(tmp_path)]
    )
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        tok = load_tokenizer(path)
        assert tok.eod_id == 0 and tok.vocab_size == 400
        text = "x = {'k': [1, 2]}\n    return x  # é"
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "neither tokenizer.json nor tokenizer.model"),
        (lambda d: (d / "vocab.txt").write_text("x") and d / "vocab.txt", "expected a directory"),
        (lambda d: (d / "bad.json").write_text("{}") and d / "bad.json", "not a readable tokenizer.json"),
    ],
)
def test_bad_tokenizer_paths(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_tokenizer(make(tmp_path))


def test_two_workers_write_the_same_shard_as_one(corpus, bpe_dir, tmp_path):
    one = preprocess([str(corpus)], str(bpe_dir), str(tmp_path / "one"), workers=1, progress=False)
    two = preprocess([str(corpus)], str(bpe_dir), str(tmp_path / "two"), workers=2, progress=False)
    assert one.documents == two.documents > 0 and one.tokens == two.tokens
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_shard_holds_each_document_then_eod(corpus, corpus_texts, bpe_dir, tmp_path):
    stats = preprocess([str(corpus)], str(bpe_dir), str(tmp_path / "s"), progress=False)
    shard = MMapIndexedDataset(tmp_path / "s")
    tok = load_tokenizer(bpe_dir)
    assert shard.dtype == np.uint16 and len(shard) == stats.documents == len(corpus_texts)
    assert shard.num_tokens == stats.tokens
    for i in (0, len(shard) // 2, len(shard) - 1):
        assert shard[i][-1] == tok.eod_id
        assert tok.decode(shard[i][:-1].tolist()) == corpus_texts[i]


def test_empty_documents_are_skipped(bpe_dir, tmp_path):
    rows = [{"text": "first"}, {"text": ""}, {"text": None}, {"text": "second"}]
    stats = preprocess(
        [write_jsonl(tmp_path / "e.jsonl", rows)], str(bpe_dir), str(tmp_path / "e"), progress=False
    )
    assert (stats.documents, stats.skipped_empty) == (2, 2)
    tok = load_tokenizer(bpe_dir)
    shard = MMapIndexedDataset(tmp_path / "e")
    assert [tok.decode(shard[i][:-1].tolist()) for i in range(2)] == ["first", "second"]


def test_input_formats_and_options(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)

    def documents(inputs, **kwargs):
        preprocess(inputs, str(bpe_dir), str(tmp_path / "f"), progress=False, append_eod=False, **kwargs)
        shard = MMapIndexedDataset(tmp_path / "f")
        return [tok.decode(shard[i].tolist()) for i in range(len(shard))]

    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "b.txt").write_text("gamma")
    assert documents([str(tmp_path / "*.txt")]) == ["alpha\nbeta\n", "gamma"]
    assert documents([str(tmp_path / "a.txt")], text_mode="line") == ["alpha", "beta"]
    pq.write_table(pa.table({"body": ["one", None, "two"]}), tmp_path / "p.parquet")
    assert documents([str(tmp_path / "p.parquet")], text_field="body") == ["one", "two"]
    (tmp_path / "c.csv").write_text("id,text\n1,three\n2,four\n")
    assert documents([str(tmp_path / "c.csv")]) == ["three", "four"]


def test_bad_input_leaves_no_partial_pair(bpe_dir, tmp_path):
    rows = [{"text": f"document {i}"} for i in range(600)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:601: no field 'text'"):
        preprocess([path], str(bpe_dir), str(tmp_path / "out" / "bad"), workers=2, progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_cli_reports_bad_input(bpe_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "hello"}])
    (tmp_path / "notes.docx").write_text("?")
    cases = [
        (["--input", str(tmp_path / "nope*.jsonl"), "--tokenizer", str(bpe_dir)], "no such file"),
        (["--input", good, "--tokenizer", str(tmp_path / "no-tokenizer")], "does not exist"),
        (["--input", str(tmp_path / "notes.docx"), "--tokenizer", str(bpe_dir)], "unsupported format"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output-prefix", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["--input", good, "--tokenizer", str(bpe_dir), "--output-prefix", str(tmp_path / "x")]) == 0
    captured = capsys.readouterr()
    assert "1 documents" in captured.out and "tok/s" in captured.err  # summary and progress bar


def test_ctrl_c_leaves_no_partial_pair(bpe_dir, tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(MMapIndexedDatasetBuilder, "add_documents", interrupt)
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "hello"}])
    out = tmp_path / "out"
    assert main(["--input", good, "--tokenizer", str(bpe_dir), "--output-prefix", str(out / "x")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_text_corpus_end_to_end(corpus, corpus_texts, bpe_dir, tmp_path):
    prefix = str(tmp_path / "stdlib")
    assert (
        main(
            ["--input", str(corpus), "--tokenizer", str(bpe_dir), "--output-prefix", prefix, "--workers", "2"]
        )
        == 0
    )
    cfg = DataConfig(train_paths=[prefix], split="90,10,0", tokenizer=str(bpe_dir))
    datasets = build_datasets(cfg, seq_len=64, num_samples={"train": 96, "valid": 8, "test": 8})
    assert datasets["test"] is None and len(datasets["valid"]) >= 8

    train = datasets["train"]
    tok = load_tokenizer(bpe_dir)
    sampler = PretrainingSampler(
        96, 0, micro_batch_size=4, data_parallel_rank=1, data_parallel_size=2, fingerprint=train.fingerprint
    )
    batch = next(iter(build_dataloader(train, sampler, num_workers=0)))
    assert batch.shape == (4, 65)
    joined = "<|endoftext|>".join(corpus_texts[: int(len(corpus_texts) * 0.9) + 1])
    for sample in batch.tolist():
        # Every piece between end-of-document tokens is real text from the training documents
        # (a sample may cut a multi-byte character at either end).
        for piece in tok.decode(sample).split("<|endoftext|>"):
            assert piece.strip("\ufffd") in joined
