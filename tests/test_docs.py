"""The product's documents point only inside the repository, and at files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub-style anchors of the headings of a Markdown file."""
    found: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    assert "shared/" not in text, f"{document.name} refers to a file outside the repository"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: — not a file of ours
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        assert linked.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
        assert linked.exists(), f"{document.name} links to a missing file: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{document.name} links to a missing heading: {target}"
