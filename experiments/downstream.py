"""Two downstream tasks built from the study's held-out data, run through lm-eval's harness
(`adaponder-eval --tasks` with `--include-path`), so every arm is scored on accuracy and on the passes
its tokens spent:

- `ponder_assert`: the value that ends a held-out generated program (`assert r ==` ...) among four
  candidates. Every step of the chain above it is needed: the task where extra depth should pay.
- `ponder_realline`: the real next line of held-out library code (packages never trained on) among
  itself and three corruptions of it (two tokens swapped, an identifier replaced, a token dropped).

Both are multiple choice scored by log-likelihood (accuracy); the examples are drawn with a fixed
seed, so every arm and seed sees the same questions.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TASKS = ("ponder_assert", "ponder_realline")
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|[^\w\s]")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_CODE = re.compile(r"^[^#]*[=(\[]")  # an assignment, call or subscript outside a comment: code, not prose


def assert_examples(programs_jsonl: Path, count: int, seed: int = 0) -> list[dict]:
    """Programs cut before their asserted value; three distinct wrong values near the right one."""
    rng = random.Random(seed)
    programs = []
    for line in programs_jsonl.read_text().splitlines():
        programs.extend(p for p in json.loads(line)["text"].split("\n\n") if "assert " in p)
    rows = []
    for program in rng.sample(programs, min(count, len(programs))):
        head, value = program.rstrip("\n").rsplit(" == ", 1)
        right = int(value)
        wrong = rng.sample([v for v in range(max(0, right - 12), right + 13) if v != right], 3)
        choices = [str(v) for v in [right, *wrong]]
        rng.shuffle(choices)
        rows.append({"context": head + " ==", "choices": choices, "label": choices.index(str(right))})
    return rows


def _corruptions(line: str, names: list[str], rng: random.Random) -> list[str] | None:
    tokens = [(m.start(), m.end()) for m in _TOKEN.finditer(line)]
    idents = [(s, e) for s, e in tokens if _IDENTIFIER.fullmatch(line[s:e])]
    foreign = sorted(set(names) - {line[s:e] for s, e in idents})
    if len(tokens) < 4 or not idents or not foreign:
        return None
    i, j = sorted(rng.sample(range(len(tokens)), 2))
    (a0, a1), (b0, b1) = tokens[i], tokens[j]
    swapped = line[:a0] + line[b0:b1] + line[a1:b0] + line[a0:a1] + line[b1:]
    s, e = rng.choice(idents)
    replaced = line[:s] + rng.choice(foreign) + line[e:]
    s, e = rng.choice(tokens)
    dropped = " ".join((line[:s] + line[e:]).split())
    choices = [line, swapped, replaced, dropped]
    return choices if len(set(choices)) == 4 else None


def realline_examples(code_jsonl: Path, count: int, seed: int = 0, context_lines: int = 6) -> list[dict]:
    """Code lines of 3+ words and 20-80 characters after `context_lines` lines of their file; the
    context keeps the line's indentation so that the choices differ only in the code itself."""
    rng = random.Random(seed)
    candidates = []
    for doc in code_jsonl.read_text().splitlines():
        lines = json.loads(doc)["text"].splitlines()
        names = sorted(set(_IDENTIFIER.findall("\n".join(lines))))
        for k in range(context_lines, len(lines)):
            body = lines[k].strip()
            if 20 <= len(body) <= 80 and len(body.split()) >= 3 and _CODE.search(body) and body[-1] != ".":
                candidates.append((lines, k, names))
    rows = []
    for lines, k, names in rng.sample(candidates, len(candidates)):
        body = lines[k].strip()
        choices = _corruptions(body, names, rng)
        if choices is None:
            continue
        rng.shuffle(choices)
        indent = lines[k][: len(lines[k]) - len(lines[k].lstrip())]
        context = "\n".join(lines[k - context_lines : k]) + "\n" + indent
        rows.append({"context": context, "choices": choices, "label": choices.index(body)})
        if len(rows) == count:
            break
    return rows


def write_tasks(data: Path, out: Path, count: int) -> Path:
    """The two tasks' rows (jsonl) and lm-eval YAML files under `out`; returns `out` (the include path)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        "ponder_assert": assert_examples(data / "valid_synthetic.jsonl", count),
        "ponder_realline": realline_examples(data / "valid.jsonl", count),
    }
    for task, examples in rows.items():
        (out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))
        (out / f"{task}.yaml").write_text(
            f"task: {task}\n"
            f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / f'{task}.jsonl'}\n"
            'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
            # ponder_realline's context ends in the line's indentation: no space before a choice.
            f'target_delimiter: "{" " if task == "ponder_assert" else ""}"\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return out
