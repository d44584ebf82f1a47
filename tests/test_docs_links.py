"""The documentation holds together: every relative link in the README, CONTRIBUTING.md, docs/ and the benchmark
READMEs reaches a file of the repository (and a heading of it, for a ``#anchor``), every page opens with whom it is
for, and the README stays a five-minute read that names no path outside the repository.

Anchors follow GitHub's rule for heading ids: the heading's text (link text kept, code and emphasis marks dropped),
lower-cased, every character other than a letter, digit, ``_``, ``-`` or space removed, spaces turned into ``-``;
a repeated heading gets ``-1``, ``-2``, ... ."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "benchmarks" / "quality" / "README.md"]
README_MAX_LINES = 160

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings inside them are not links and headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path, root: Path = ROOT) -> tuple[list[str], int]:
    """Every relative link of ``page`` that does not resolve inside ``root``, as ``page: target (why)``; and how many
    relative links were read."""
    problems, count = [], 0
    text = CODE_SPAN.sub("", prose(page.read_text()))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not files of ours
            continue
        count += 1
        path_part, _, anchor = target.partition("#")
        where = (page.parent / path_part).resolve() if path_part else page
        name = f"{page.relative_to(root)}: {target}"
        if not where.is_relative_to(root):
            problems.append(f"{name} (outside the repository)")
        elif not where.exists():
            problems.append(f"{name} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            problems.append(f"{name} (no heading with that anchor in {where.relative_to(root)})")
    return problems, count


@pytest.mark.parametrize(("heading", "expected"), [
    ("Memory, speed and the GPU path", "memory-speed-and-the-gpu-path"),
    ("Real text: word analogies", "real-text-word-analogies"),
    ("Demo (`make demo`, i.e. `renyi-lora demo --output_dir demo_output`)",
     "demo-make-demo-ie-renyi-lora-demo---output_dir-demo_output"),
    ("1. A conflict the model can represent is flat at alpha = 1",
     "1-a-conflict-the-model-can-represent-is-flat-at-alpha--1"),
    ("From TRL and PEFT to [renyi-lora](README.md)", "from-trl-and-peft-to-renyi-lora"),
])
def test_slug_follows_githubs_heading_ids(heading, expected):
    assert slug(heading) == expected


def test_the_checker_finds_a_missing_file_a_missing_anchor_and_a_path_outside(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "other.md").write_text("# Other\n\n## Known heading\n\n## Known heading\n")
    page = root / "page.md"
    page.write_text("# Page\n\n[ok](other.md#known-heading) [twice](other.md#known-heading-1) [here](#page)\n"
                    "[gone](missing.md) [bad anchor](other.md#unknown) [out](../elsewhere.md) [web](https://x.org)\n"
                    "```\n[in code](not-a-link.md)\n```\n`[in a span](nor-this.md)`\n")
    (tmp_path / "elsewhere.md").write_text("# Outside\n")
    problems, count = broken_links(page, root)
    assert count == 6
    assert problems == ["page.md: missing.md (no such file)",
                        "page.md: other.md#unknown (no heading with that anchor in other.md)",
                        "page.md: ../elsewhere.md (outside the repository)"]


def test_every_relative_link_and_anchor_resolves():
    problems, total = [], 0
    for page in PAGES:
        assert page.is_file(), f"{page.relative_to(ROOT)} is gone: update PAGES in this test"
        found, count = broken_links(page)
        problems += found
        total += count
    assert total > 50  # the pages link to each other; a regex that matched nothing would pass vacuously
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_page_says_who_it_is_for(page):
    """Between the title and the first section, one paragraph starts with "For " (whom the page serves)."""
    opening = re.split(r"^## ", prose(page.read_text()), maxsplit=1, flags=re.M)[0]
    paragraphs = [p.strip() for p in opening.split("\n\n")]
    assert any(p.startswith("For ") for p in paragraphs), (
        f"{page.relative_to(ROOT)}: open with a paragraph that starts 'For <reader> ...' before the first section")


def test_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move details to docs/ and link them")


def test_readme_names_no_path_outside_the_repository():
    text = README.read_text()
    for outside in ("../shared", "/work/", "../"):
        assert outside not in text, f"README.md names {outside!r}: readers have only the repository"


def test_readme_keeps_the_test_command_the_ci_runs():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", README.read_text(), re.M), "README.md: keep the `make test` line"
