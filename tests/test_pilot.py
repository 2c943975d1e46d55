"""The regime pilot: generated programs, paired statistics and the decision it reports."""

import ast
import json
import random

import pytest

from experiments.arms import PILOT
from experiments.corpus import synthetic_program, write_synthetic
from experiments.downstream import write_tasks
from experiments.pilot import mixture_loss, paired_interval, write_pilot_report
from experiments.study import Layout


def _values(program: str) -> tuple[dict[str, int], int, int]:
    """Evaluate a generated program by walking its syntax tree (never exec): the variables, and the
    asserted and the computed value of its last line."""
    values: dict[str, int] = {}
    tree = ast.parse(program)
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
    for node in tree.body[:-1]:
        value = node.value
        if isinstance(value, ast.Constant):
            values[node.targets[0].id] = value.value
        else:
            values[node.targets[0].id] = ops[type(value.op)](values[value.left.id], value.right.value)
    check = tree.body[-1].test
    return values, check.comparators[0].value, values[check.left.id]


def test_generated_programs_are_consistent_and_deterministic(tmp_path):
    rng = random.Random(3)
    for _ in range(300):
        program = synthetic_program(rng)
        values, asserted, computed = _values(program)
        assert asserted == computed
        assert all(0 <= v <= 999 for v in values.values())
        for line in program.splitlines():  # the optional comment states the value just computed
            if "#" in line:
                assert int(line.split("#")[1]) == values[line.split()[0]]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_synthetic(first, 50_000, seed=1) == write_synthetic(second, 50_000, seed=1)
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_size <= 50_000
    assert write_synthetic(second, 50_000, seed=2) and first.read_bytes() != second.read_bytes()


def test_paired_interval_is_students_t():
    mean, low, high = paired_interval([0.1, 0.3])
    assert mean == pytest.approx(0.2)
    # sd of (0.1, 0.3) = 0.1414; t(0.975, df 1) = 12.706; half width 12.706 * 0.1414 / sqrt 2 = 1.2706
    assert (low, high) == pytest.approx((0.2 - 1.2706, 0.2 + 1.2706), abs=1e-3)
    assert paired_interval([0.1]) is None


def _result(code: float, programs: float, tokens=(900, 100)) -> dict:
    return {
        "parameters": 1000,
        "train_tokens": 3000,
        "train_wall_seconds": 60.0,
        "train_tokens_per_sec": 50.0,
        "shards": {
            "code": {"loss": code, "tokens": tokens[0]},
            "programs": {"loss": programs, "tokens": tokens[1]},
        },
        "training_curve": {"lm_loss": [[s, 5.0 - s / 100] for s in range(0, 101, 10)]},
    }


@pytest.mark.parametrize(
    "ponderlm_losses, verdict",
    [
        ([(3.90, 1.00), (3.91, 1.05)], "PASSES"),  # mixture gain ~0.15 and ~0.14
        ([(3.99, 1.10), (4.02, 1.10)], "FAILS"),  # mixture gains 0.049 and 0.022: below the rule
        ([(3.90, 1.00)], "PASSES SO FAR (not decided)"),  # one seed of two: a pass needs both
        ([(4.05, 1.50)], "FAILS"),  # a seed that loses decides the rule on its own
    ],
)
def test_the_report_states_the_paired_decision(tmp_path, ponderlm_losses, verdict):
    layout = Layout(PILOT, tmp_path / "work", tmp_path / "out")
    for seed, (code, programs) in zip(PILOT.seeds, ponderlm_losses):
        for name, result in (("vanilla", _result(4.0, 1.5)), ("ponderlm", _result(code, programs))):
            path = layout.result_file(f"{name}-s{seed}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
    readme = write_pilot_report(layout).read_text()
    assert f"**Verdict: {verdict}" in readme
    assert mixture_loss(_result(4.0, 1.5)) == pytest.approx(0.9 * 4.0 + 0.1 * 1.5)
    assert "| vanilla-s1 | 1,000 | 3,000 | 3.00 | 4.0000 | 1.5000 | 3.7500 | 0.2000 | 60 | 50 |" in readme


def test_downstream_questions_have_one_right_answer(tmp_path):
    write_synthetic(tmp_path / "valid_synthetic.jsonl", 30_000, seed=2)
    code = "\n".join(f"value_{i} = compute(first_{i}, second[{i}])" for i in range(40))
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": code}) + "\n")
    write_tasks(tmp_path, tmp_path / "tasks", 10)
    asserts = [json.loads(x) for x in (tmp_path / "tasks" / "ponder_assert.jsonl").read_text().splitlines()]
    assert len(asserts) == 10
    for row in asserts:
        program = row["context"] + " " + row["choices"][row["label"]] + "\n"
        _, asserted, computed = _values(program)
        assert asserted == computed and len(set(row["choices"])) == 4
    lines = [json.loads(x) for x in (tmp_path / "tasks" / "ponder_realline.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    for row in lines:
        real = row["choices"][row["label"]]
        assert real in code.splitlines() and len(set(row["choices"])) == 4
        assert row["context"].count("\n") == 6 and row["context"] + real in code  # the 6 lines before it
    assert 'target_delimiter: ""' in (tmp_path / "tasks" / "ponder_realline.yaml").read_text()
