"""Every relative link of README.md and docs/*.md reaches a file of the repository, and every #anchor a heading
of that file (GitHub's heading ids), so moving text between pages cannot leave a dead link behind."""

import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str, inline_code: bool = False) -> str:
    """The text outside fenced code blocks, and outside inline code unless asked (links in code are examples)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line if inline_code else re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's id of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    ids = set()
    for line in prose(page.read_text(encoding="utf-8"), inline_code=True).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


def broken(page: Path, target: str, root: Path = REPO) -> str | None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: no such file {dest}"
    if root.resolve() not in dest.parents:
        return f"{target}: outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading #{anchor} in {dest.name}"
    return None


def test_the_pages_exist_and_link_somewhere():
    assert (REPO / "docs").is_dir()
    assert sum(len(relative_links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    problems = [p for p in (broken(page, t) for t in relative_links(page)) if p]
    assert problems == []


def test_the_checker_sees_a_dead_link_and_a_dead_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title: one `two`\n\n## Title: one two\n\n[a](missing.md) [b](#nope) [c](#title-one-two-1)\n"
                    "```\n[in code](also-missing.md)\n```\n")
    assert anchors(page) == {"title-one-two", "title-one-two-1"}
    assert relative_links(page) == ["missing.md", "#nope", "#title-one-two-1"]
    assert broken(page, "missing.md", tmp_path) == f"missing.md: no such file {tmp_path / 'missing.md'}"
    assert broken(page, "#nope", tmp_path) == "#nope: no heading #nope in page.md"
    assert broken(page, "#title-one-two-1", tmp_path) is None
    assert broken(tmp_path / "sub" / "inner.md", "../page.md", tmp_path / "sub") == "../page.md: outside the repository"
