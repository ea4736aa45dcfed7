"""The README's links inside itself land on a heading, and its links to files name files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


def test_heading_anchors_follow_githubs_rule():
    markdown = "# Under load\n```\n# not a heading\n```\n### Measured on a GPU: H200, GPT-J-6B, 2026-12-04\n"
    assert heading_anchors(markdown) == {"under-load", "measured-on-a-gpu-h200-gpt-j-6b-2026-12-04"}


def test_every_link_in_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    anchors = heading_anchors(text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README has links"
    broken = [
        target
        for target in targets
        if (target[1:] not in anchors if target.startswith("#") else
            not target.startswith(("http://", "https://")) and not (ROOT / target).exists())
    ]  # fmt: skip
    assert not broken, f"links to no heading or file: {broken}"
