"""The project's own documentation stays true.

* Code and tests cite sections of docs/*.md (``docs/api.md §2.3``); every such
  section must exist, numbered in a heading of that file, and nothing may cite
  the old contract files outside the repository (the "SPEC"/"DESIGN" section
  style of the first release).
* Cross references inside docs/*.md (``§2.3``, ``[graph.md](graph.md) §4``)
  resolve too.
* Every ```python block of README.md, docs/*.md and examples/README.md runs.
  A block may be skipped only by an HTML comment on the line before its fence
  that gives one of the reasons in ``SKIP_REASONS``, and only while that
  reason holds on this machine.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CITING_DIRS = ("gpuloss", "kernels", "tests", "bench")
TEXT_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".hpp", ".cpp", ".md", ".txt", ".toml", ".prototxt", ".cfg",
                 ".ini", ".json", ".sh"}

# Headings such as "## 2.1 Softmax cross entropy" or "### 3.4. What gives NaN".
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s+\S")
# "docs/api.md §2.1", "docs/api.md §2.1, §2.3" (a list after one file name).
DOC_CITATION = re.compile(r"docs/([\w-]+)\.md\s*§\s*(\d+(?:\.\d+)*)((?:\s*(?:,|and|or|/)\s*§\s*\d+(?:\.\d+)*)*)")
MORE_SECTIONS = re.compile(r"§\s*(\d+(?:\.\d+)*)")
# The citation style of the old contract files (their names, upper case, then a section sign),
# spelt in pieces so that this file does not match itself.
OLD_STYLE = re.compile(r"\b(?:" + "SPEC" + "|" + "DESIGN" + r")(?:\.md)?\s*§")


def _strip_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def sections(path: Path) -> list[str]:
    """Section numbers of a Markdown file's numbered headings, in order."""
    return [m.group(1) for _, line in _strip_fences(path.read_text(encoding="utf-8"))
            if (m := HEADING.match(line))]


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def citing_files() -> list[Path]:
    files = []
    for d in CITING_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts:
                files.append(p)
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


# -- the numbered sections themselves -----------------------------------------------------------

def test_the_three_reference_pages_exist():
    for name in ("api", "design", "graph"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_section_numbers_are_unique_and_nested(path):
    nums = sections(path)
    dup = sorted({n for n in nums if nums.count(n) > 1})
    assert not dup, f"{path.name}: section numbers used twice: {dup}"
    for n in nums:
        if "." in n:
            parent = n.rsplit(".", 1)[0]
            assert parent in nums, f"{path.name}: section {n} has no parent section {parent}"


# -- citations from code into docs/ ---------------------------------------------------------------

def _citations(text: str):
    for m in DOC_CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        yield line, m.group(1), m.group(2)
        for extra in MORE_SECTIONS.finditer(m.group(3)):
            yield line, m.group(1), extra.group(1)


def test_every_cited_section_exists():
    known = {p.stem: set(sections(p)) for p in doc_files()}
    bad = []
    readmes = [p for p in (ROOT / "README.md", ROOT / "examples" / "README.md") if p.is_file()]
    for path in citing_files() + readmes + sorted((ROOT / "examples").glob("*.p*")):
        for line, doc, sec in _citations(_read(path)):
            where = f"{path.relative_to(ROOT)}:{line}"
            if doc not in known:
                bad.append(f"{where}: docs/{doc}.md does not exist")
            elif sec not in known[doc]:
                bad.append(f"{where}: docs/{doc}.md has no section {sec}")
    assert not bad, "citations of missing documentation:\n" + "\n".join(bad)


def test_nothing_cites_the_old_contract_files():
    bad = []
    for path in citing_files():
        text = _read(path)
        for m in OLD_STYLE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            bad.append(f"{path.relative_to(ROOT)}:{line}: {text.splitlines()[line - 1].strip()}")
    assert not bad, ("cite docs/<page>.md §<section> instead (the old contract files are not shipped):\n"
                     + "\n".join(bad))


def test_the_checks_catch_what_they_should():
    """The patterns above are not vacuous."""
    assert list(_citations("see docs/api.md §2.1, §2.3 and docs/graph.md §4.")) == [
        (1, "api", "2.1"), (1, "api", "2.3"), (1, "graph", "4")]
    old = "SP" + "EC §2.3"
    assert OLD_STYLE.search(old) and OLD_STYLE.search("DES" + "IGN §3")
    assert not OLD_STYLE.search("a SPECIAL §3") and not OLD_STYLE.search("docs/design.md §3")
    assert HEADING.match("## 2.1 Softmax cross entropy").group(1) == "2.1"
    assert HEADING.match("### 3.4. What gives NaN").group(1) == "3.4"
    assert not HEADING.match("## Overview")


# -- cross references inside docs/ ----------------------------------------------------------------

# "[graph.md](graph.md) §4", "graph.md §4", "design.md §5.4": a section of another page.
_OTHER_PAGE = re.compile(r"(?:\]\()?\b([\w-]+)\.md\)?\s*§\s*(\d+(?:\.\d+)*)")
_BARE = re.compile(r"§\s*(\d+(?:\.\d+)*)")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_cross_references_inside_docs_resolve(path):
    known = {p.stem: set(sections(p)) for p in doc_files()}
    prose = _strip_fences(path.read_text(encoding="utf-8"))
    text = "\n".join(line for _, line in prose)      # a reference may wrap onto the next line

    def line_of(offset: int) -> int:
        return prose[text.count("\n", 0, offset)][0]

    bad, spans = [], []
    for m in _OTHER_PAGE.finditer(text):
        spans.append(m.span())
        doc, sec = m.group(1), m.group(2)
        if doc not in known:
            bad.append(f"{path.name}:{line_of(m.start())}: no docs/{doc}.md to cite §{sec} of")
        elif sec not in known[doc]:
            bad.append(f"{path.name}:{line_of(m.start())}: {doc}.md has no section {sec}")
    # A bare "§n" means this page's section n, on pages that number their sections (a page without
    # numbered headings may use "§" for a paper's sections).
    for m in _BARE.finditer(text if known[path.stem] else ""):
        if any(a <= m.start() < b for a, b in spans):
            continue
        if m.group(1) not in known[path.stem]:
            bad.append(f"{path.name}:{line_of(m.start())}: no section {m.group(1)} in this page")
    assert not bad, "\n".join(bad)


# -- the Python examples in the Markdown files run ------------------------------------------------

def _has_gpu() -> bool:
    from gpuloss.backends import cuda_unavailable_reason
    return cuda_unavailable_reason() is None


# The only reasons a block may be skipped for, and whether they hold here.
SKIP_REASONS = {
    "needs a GPU": lambda: not _has_gpu(),
    "needs torch": lambda: importlib.util.find_spec("torch") is None,
}
_SKIP = re.compile(r"^<!--\s*skip:\s*(.*?)\s*-->\s*$")


def python_blocks() -> list:
    files = [ROOT / "README.md", *doc_files(), ROOT / "examples" / "README.md"]
    params = []
    for path in files:
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                j = start
                while j < len(lines) and lines[j].strip() != "```":
                    j += 1
                code = "\n".join(lines[start:j]) + "\n"
                k = i - 1
                while k >= 0 and not lines[k].strip():
                    k -= 1
                skip = _SKIP.match(lines[k].strip()) if k >= 0 else None
                rel = path.relative_to(ROOT).as_posix()
                params.append(pytest.param(rel, start, code, skip.group(1) if skip else None,
                                           id=f"{rel}:{start}"))
                i = j
            i += 1
    return params


@pytest.mark.parametrize("rel, line, code, skip_reason", python_blocks())
def test_python_block_runs(rel, line, code, skip_reason, tmp_path, monkeypatch):
    if skip_reason is not None:
        assert skip_reason in SKIP_REASONS, (
            f"{rel}:{line}: unknown skip reason {skip_reason!r}; allowed: {sorted(SKIP_REASONS)}")
        if SKIP_REASONS[skip_reason]():
            pytest.skip(f"{rel}:{line}: {skip_reason}")
    monkeypatch.chdir(tmp_path)            # a block that writes files writes them here
    monkeypatch.delenv("GPULOSS_BACKEND", raising=False)
    # Padding keeps the line numbers of tracebacks those of the Markdown file.
    exec(compile("\n" * (line - 1) + code, str(ROOT / rel), "exec"), {"__name__": "__doc_block__"})


def test_every_skip_marker_gives_an_allowed_reason():
    bad = []
    for path in [ROOT / "README.md", *doc_files(), ROOT / "examples" / "README.md"]:
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = _SKIP.match(line.strip())
            if m and m.group(1) not in SKIP_REASONS:
                bad.append(f"{path.relative_to(ROOT)}:{i}: {m.group(1)!r}")
    assert not bad, f"skip markers must give one of {sorted(SKIP_REASONS)}:\n" + "\n".join(bad)

