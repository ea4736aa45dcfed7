"""The links of the project's Markdown files (the README, benchmarks/NOTES.md, ...) land on a file that exists and,
with `#anchor`, on one of its headings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings outside code blocks: lower case, punctuation but `-` and `_`
    dropped, spaces as hyphens."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(path: Path) -> list[str]:
    """The links of a Markdown file to no file, or to no heading of the file they name (itself by default)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked.read_text(encoding="utf-8"))):
            broken.append(target)
    return broken


def test_heading_anchors_follow_githubs_rule():
    markdown = "# Under load\n```\n# not a heading\n```\n### Measured on a GPU: H200, GPT-J-6B, 2026-12-04\n"
    assert heading_anchors(markdown) == {"under-load", "measured-on-a-gpu-h200-gpt-j-6b-2026-12-04"}


def test_a_link_to_another_files_heading_is_checked_against_that_file(tmp_path):
    (tmp_path / "README.md").write_text("# Top\n## Measured on a CPU\n")
    (tmp_path / "docs").mkdir()
    notes = tmp_path / "docs" / "NOTES.md"
    notes.write_text("[a](../README.md#measured-on-a-cpu) [b](#top) [c](../README.md#nowhere) [d](gone.png)\n# Here\n")
    assert broken_links(notes) == ["#top", "../README.md#nowhere", "gone.png"]


@pytest.mark.parametrize(
    "name", subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
)
def test_every_link_in_the_projects_markdown_resolves(name):
    assert not broken_links(ROOT / name), f"{name}: links to no file or heading"
