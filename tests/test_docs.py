"""The README and docs/ stay inside the repository, and their commands can be pasted."""

import pathlib
import re
import shlex

import pytest

from envs.rollout import _parser

ROOT = pathlib.Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "envs" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown links


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_point_only_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        resolved = (doc.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc.name} links {target}"
    assert "../" not in text, f"{doc.name} names a path above its own folder; a clone may not have it"


def test_readme_rollout_commands_parse():
    """Each rollout command in the README is one the CLI accepts as written (no a|b|c choices)."""
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python -m envs.rollout")]
    assert commands
    for command in commands:
        words = shlex.split(command, posix=True)
        assert "|" not in "".join(words), command
        _parser().parse_args(words[3:])
