"""The documentation holds together: the README stays a front door that links every page,
and every file (and section) the code and docs cite exists in the repo."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# A repo-relative path as the code and docs cite one, with an optional section anchor.
CITED = re.compile(
    r"(?<![\w./-])((?:docs|benchmarks|tests|tether|examples)/[\w./-]*\w\.(?:md|py|cpp|yaml|jsonl|jpg))"
    r"(#[\w-]+)?"
)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub renders it: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def citing_files() -> list[Path]:
    files = [README, ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "tether").rglob("*.py")) + sorted((ROOT / "tether").rglob("*.cpp"))
    return [*files, *sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "benchmarks/README.md"]


def test_readme_is_a_front_door_that_links_every_doc_page():
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes"
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [p for p in pages if f"({p}" not in text]
    assert not missing, f"README.md links none of {missing}"
    assert "make test" in text and "make demo" in text


def test_every_cited_file_and_section_exists():
    wrong = []
    for source in citing_files():
        for path, anchor in CITED.findall(source.read_text()):
            target = ROOT / path
            if not target.exists():
                wrong.append(f"{source.relative_to(ROOT)} cites {path}, which does not exist")
            elif anchor and anchor[1:] not in anchors(target):
                wrong.append(f"{source.relative_to(ROOT)} cites {path}{anchor}: no such section")
    assert not wrong, "\n".join(wrong)


def test_the_citation_check_can_fail():
    assert CITED.findall("see docs/no-such-page.md#x and tether/core/ops.py.") == [
        ("docs/no-such-page.md", "#x"),
        ("tether/core/ops.py", ""),
    ]
    assert slug("Responses that never end (missing EOS)") == "responses-that-never-end-missing-eos"
