"""The docs name only what exists: repository paths, ``grpo_kernels`` modules and names, link targets and anchors.

Reads README.md, CONTRIBUTING.md and docs/*.md as text (nothing is imported):

- every inline code span that is a repository path (it starts with a top-level folder or names a top-level
  file) exists; a glob (``csrc/cpu/*.cpp``) matches something; spans with a placeholder (``tests/test_<op>.py``)
  and generated outputs (:data:`GENERATED`) are left out;
- every dotted ``grpo_kernels.…`` name in a code span is a module of the package, or a name its module defines
  or imports at top level (read with ``ast``);
- every relative markdown link points to a file that exists and, with ``#anchor``, to a heading of that file.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_FOLDERS = ("grpo_kernels/", "csrc/", "benchmarks/", "tests/", "examples/", "docs/", ".ci/")
TOP_FILES = ("Makefile", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CONTRIBUTING.md")
# Written by a run or a build, so absent from a clean clone: not checked.
GENERATED = ("examples/output/", "build/")
# Names of the package that are no Python source: the compiled extension.
NOT_SOURCE = {"grpo_kernels._C"}

FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", flags=re.M)
DOTTED = re.compile(r"\bgrpo_kernels(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def prose(path: Path) -> str:
    """The markdown of ``path`` without its fenced code blocks (commands and examples are not names)."""
    return FENCE.sub("", path.read_text())


def code_tokens(path: Path) -> list[str]:
    """The whitespace-separated words of every inline code span of ``path``, trailing punctuation removed."""
    return [word.rstrip(".,;:)") for span in CODE_SPAN.findall(prose(path)) for word in span.split()]


def repository_path(word: str) -> bool:
    return word.startswith(TOP_FOLDERS) or word in TOP_FILES


def path_exists(word: str) -> bool:
    if any(ch in word for ch in "*?["):
        return any(ROOT.glob(word))
    return (ROOT / word).exists()


@functools.lru_cache(maxsize=None)
def top_level_names(module_file: Path) -> frozenset:
    """Names a module binds at top level: definitions, assignments, imports."""
    names = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def module_file(parts: list[str]):
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_name_exists(name: str) -> bool:
    """``grpo_kernels.a.b[.attr]``: the longest prefix that is a module exists and defines the one name after it
    (an attribute of that name, e.g. a method, is not checked)."""
    if name in NOT_SOURCE:
        return True
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        found = module_file(parts[:end])
        if found is not None:
            rest = parts[end:]
            return not rest or rest[0] in top_level_names(found)
    return False


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(h) for h in HEADING.findall(prose(path))}


def cases(kind):
    found = []
    for doc in DOCS:
        if kind == "path":
            words = {w for w in code_tokens(doc) if repository_path(w) and "<" not in w and not w.startswith(GENERATED)}
        elif kind == "name":
            words = {m for w in code_tokens(doc) for m in DOTTED.findall(w)}
        else:
            words = {t for t in LINK.findall(prose(doc)) if not re.match(r"[a-z]+:", t)}
        found += [pytest.param(doc, w, id=f"{doc.name}:{w}") for w in sorted(words)]
    return found


def test_the_docs_exist_and_name_things():
    assert (ROOT / "CONTRIBUTING.md").is_file() and (ROOT / "docs" / "design.md").is_file()
    assert len(cases("path")) > 50 and len(cases("name")) > 10 and len(cases("link")) > 10


@pytest.mark.parametrize("doc, path", cases("path"))
def test_repository_path_exists(doc, path):
    assert path_exists(path), f"{doc.name} names {path}, which is not in the repository"


@pytest.mark.parametrize("doc, name", cases("name"))
def test_package_name_exists(doc, name):
    assert dotted_name_exists(name), f"{doc.name} names {name}, which grpo_kernels does not define"


@pytest.mark.parametrize("doc, target", cases("link"))
def test_link_target_exists(doc, target):
    file_part, _, anchor = target.partition("#")
    linked = (doc.parent / file_part).resolve() if file_part else doc
    assert linked.exists(), f"{doc.name} links {target}: no such file"
    if anchor and linked.suffix == ".md":
        assert anchor in anchors(linked), f"{doc.name} links {target}: {linked.name} has no heading #{anchor}"


def test_slug_is_githubs():
    assert slug("Scale-out: vocabulary shards, data parallelism, packed sequences") == \
        "scale-out-vocabulary-shards-data-parallelism-packed-sequences"
    assert slug('The self-check and `backend="auto"` on a GPU') == "the-self-check-and-backendauto-on-a-gpu"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_performance_shows_one_run_per_device_and_links_the_others(monkeypatch):
    from benchmarks import render_readme

    monkeypatch.setattr(render_readme, "environment_line", lambda run: f"{run['preset']} environment")

    def run(device, preset, stem):
        return {"stem": stem, "preset": preset, "environment": {"device": device}, "records": []}

    runs = [run("cpu", "cpu-small", "a"), run("cpu", "cpu-growth", "b"), run("cuda", "gpu-headline", "c")]
    body = render_readme.section(runs)
    assert body.count("**CPU**") == 1 and body.count("**CUDA**") == 1
    assert "Other CPU runs: `cpu-growth` [b.md](benchmarks/results/b.md)." in body
    assert "Other CUDA runs" not in body
