"""What users read stands on its own: no shipped file points at the developers' notes (which users do
not have), and every relative link in the README and docs/ resolves, anchors included."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    "README.md",
    "BENCHMARKS.md",
    "setup.py",
    "pyproject.toml",
    ".ci",
    "docs",
    "configs",
    "ds_configs",
    "model",
    "data",
    "training",
    "launcher",
    "experiments",
    "benchmarks",
    "tests",
]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".sh", ".txt", ".cfg", ""}
SKIPPED_DIRS = {"__pycache__", "work", "runs", ".venv", ".pytest_cache"}
NOTES = re.compile(r"\.\./shared|shared/reference|\bSPEC\b|paper-notes|infra-notes|style-anchors")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        root = REPO / name
        candidates = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in candidates:
            if path.is_file() and path.suffix in TEXT_SUFFIXES:
                # This file names the notes to find them.
                if not SKIPPED_DIRS & set(path.relative_to(REPO).parts) and path != Path(__file__).resolve():
                    files.append(path)
    return files


def test_no_shipped_file_cites_the_developers_notes():
    files = shipped_files()
    assert REPO / "docs" / "method.md" in files and len(files) > 50
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if NOTES.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert hits == [], "\n".join(hits)


def test_the_notes_pattern_catches_each_way_of_citing_them():
    for line in ["see ../shared/SPEC.md", "(SPEC.md section 1)", "SPEC's KV alignment", "paper-notes 1.4"]:
        assert NOTES.search(line), line
    for line in ["_SPECIAL_ROLES", "a spec", "docs/method.md"]:
        assert not NOTES.search(line), line


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: each heading lower-cased, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def test_readme_and_docs_links_resolve():
    readme = REPO / "README.md"
    targets = LINK.findall(readme.read_text())
    linked_docs = {t.partition("#")[0] for t in targets if t.startswith("docs/")}
    on_disk = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert linked_docs == on_disk, "the README links every page of docs/"
    for page in [readme, *sorted((REPO / "docs").glob("*.md"))]:
        assert broken_links(page) == [], page.name


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n## Second (part 2)\n")
    page = tmp_path / "index.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#second-part-2) [ok](https://example.org/x) "
        "[gone](b.md) [bad anchor](a.md#third)\n"
    )
    assert broken_links(page) == ["b.md: no such file", "a.md#third: no heading #third in a.md"]
