"""The README and docs/ hold together: every relative link reaches its file (and heading), and
the README's two commands are the ones CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens gone, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # markup; GitHub keeps underscores
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_FENCE.sub("", page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_slugs_are_githubs():
    assert slug("Evaluation: metrics, and baseline vs fine-tuned side by side") == \
        "evaluation-metrics-and-baseline-vs-fine-tuned-side-by-side"
    assert slug("## `data.video`".lstrip("# ")) == "datavideo"


def commands(text: str) -> dict[str, list[str]]:
    """The pip install and pytest commands of a shell text, as argument lists without ``-q``."""
    found = {}
    for part in re.split(r"&&|\n", text):
        words = [w for w in shlex.split(part.strip(), comments=True) if w != "-q"]
        if words[:2] == ["pip", "install"]:
            found["install"] = words
        elif words[:3] == ["python", "-m", "pytest"]:
            found["test"] = words
    return found


def test_the_readmes_two_commands_are_the_ones_ci_runs():
    readme = ROOT.joinpath("README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    ours, ci = commands(first_block), commands(ROOT.joinpath(".ci", "run").read_text())
    assert ours.keys() == {"install", "test"} and ours == ci, (ours, ci)
