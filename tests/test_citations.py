"""The repository explains itself: what its docs and code cite is in it.

* A path that starts with one of the repository's own top-level directories (`docs/…`,
  `jaxbench/…`, `tests/…`) names a file or directory that exists; a glob names at least one.
* A citation of the computation or the protocol names a section that docs/algorithm.md or
  docs/protocol.md has (`docs/protocol.md §1.4, §3.7`; within those two pages, a bare `§5` is one of
  their own sections).
* Nothing points at material outside the repository that a clone does not have: the project's
  shared notes or their spec pages.

Paths of other repositories (the network's reference, Vast's PyWorker, GitHub Actions such as
`docker/build-push-action`), of the machine the code runs on (`/var/log/…`, `$WORKSPACE_DIR/…`) and of
build outputs (`__pycache__`) are not this repository's and are not checked.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".yml", ".yaml", ".ipynb", ".cfg", ".ini"}
TEXT_NAMES = {"Dockerfile", ".dockerignore", "run"}
SECTION_DOCS = {"algorithm": ROOT / "docs" / "algorithm.md", "protocol": ROOT / "docs" / "protocol.md"}
# What a clone does not have, however it is spelled (the notes lived beside the repository).
OUTSIDE = [re.compile(p, re.IGNORECASE) for p in (
    r"(?<![\w.-])(?:\.\./)?" + "shared" + r"/",
    r"\bspec\s*§",
    "seed" + "-service",
    "poc" + "-algorithm",
    "reference" + "-numbers",
)]
# A path-like token: segments of word characters, dots and dashes (and glob or placeholder
# characters, so that such tokens are seen whole), joined by slashes; not the tail of a longer path
# or a URL.
PATH_TOKEN = re.compile(r"(?<![\w./$<{*-])[\w.*<>{}$,-]+(?:/[\w.*<>{}$,-]+)+/?")
CITATION = re.compile(r"docs/(algorithm|protocol)\.md((?:\s*(?:,|–|-|and)?\s*§\s?\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")


def repository_files() -> list[Path]:
    """The files of the checkout: git's list where there is one (not the ignored venvs and caches)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "build"}
        files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file())


FILES = repository_files()
TOP_DIRECTORIES = {p.relative_to(ROOT).parts[0] for p in FILES if len(p.relative_to(ROOT).parts) > 1}
TEXT_FILES = [p for p in FILES if (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES) and p != Path(__file__)]


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [alt for option in match.group(1).split(",")
            for alt in expand_braces(pattern[: match.start()] + option + pattern[match.end():])]


def ours(token: str) -> bool:
    """Whether a path-like token names something of this repository's."""
    first = token.split("/")[0]
    return first in TOP_DIRECTORIES and not token.endswith("-action") and "__pycache__" not in token


def exists(token: str) -> bool:
    token = token.rstrip("/.,")
    # A placeholder (`constraints-<flavour>.txt`, an f-string's `{flavour}`) or a shell variable.
    if "<" in token or "$" in token or re.search(r"\{[^{},]*\}", token):
        return True
    relative = [str(p.relative_to(ROOT)) for p in FILES]
    for candidate in expand_braces(token):
        if any(c in candidate for c in "*?["):
            if not any(fnmatch.fnmatch(name, candidate) for name in relative):
                return False
        elif not (ROOT / candidate).exists():
            return False
    return True


def sections(doc: Path) -> set[str]:
    return set(re.findall(r"^#+ §(\d+(?:\.\d+)*) ", text_of(doc), flags=re.M))


def test_the_section_docs_are_numbered():
    """The numbers code cites exist: §1–§7 of the computation, the protocol's routes and §9."""
    assert {str(n) for n in range(1, 8)} <= sections(SECTION_DOCS["algorithm"])
    assert {"1", "1.1", "1.4", "2", "3", "3.7", "4", "9"} <= sections(SECTION_DOCS["protocol"])


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_path_and_section_is_in_the_repository(path):
    text = text_of(path)
    problems = [f"points outside the repository: {m.group(0)!r}" for pattern in OUTSIDE for m in pattern.finditer(text)]
    for match in PATH_TOKEN.finditer(text):
        token = match.group(0)
        if text[match.end():match.end() + 1] == "@":  # `owner/action@v1`: a GitHub Action
            continue
        if ours(token) and not exists(token):
            problems.append(f"no such path: {token}")
    citation_spans = []
    for match in CITATION.finditer(text):
        doc = match.group(1)
        citation_spans.append(match.span(2))
        for number in SECTION.findall(match.group(2)):
            if number not in sections(SECTION_DOCS[doc]):
                problems.append(f"docs/{doc}.md has no §{number}")
    if path in SECTION_DOCS.values():  # a bare § on these pages is one of their own sections
        own = sections(path)
        for match in SECTION.finditer(text):
            cited_elsewhere = any(start <= match.start() < end for start, end in citation_spans)
            if not cited_elsewhere and match.group(1) not in own:
                problems.append(f"no §{match.group(1)} on this page")
    assert not problems, "\n".join(problems)
