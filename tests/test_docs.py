"""The documentation: README.md stays an entry point, every link in it and in docs/ resolves inside the
repository, and every `emloc-stream` command the pages show is one the command line accepts."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PAGES = [*GUIDES, *sorted((ROOT / "docs" / "benchmarks").glob("*.md"))]  # with the benchmark reports
MAX_README_WORDS = 1300  # "at most ~1,200 words": what it is, the two commands, an example per use, where to read more

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)  # an indented code block (after a blank line)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)`'\"<>]*", re.I)
# Example addresses in code are placeholders, never a site a reader would be sent to.
PLACEHOLDER_HOSTS = re.compile(r"^(|\.\.\.|127\.0\.0\.1|localhost|\[::1\]|[a-z0-9-]+\.local|HOST|ADDRESS|cam|camera)"
                               r"(:|/|$)")


def prose(text: str) -> str:
    """The text of a page without its code: fenced blocks, indented blocks and inline code."""
    text = FENCE.sub("", text)
    text = re.sub(r"(?<=\n\n)" + INDENTED.pattern, "", text, flags=re.M)
    return INLINE_CODE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def test_readme_starts_with_the_two_commands():
    """CI (.ci/run) runs the line marked '# run the tests' from README's first 20 lines, exactly as written."""
    lines = README.read_text().splitlines()
    assert lines[0] == "```bash" and lines[3] == "```", lines[:4]
    assert lines[1].endswith("# run the offline demo") and "emloc-stream demo" in lines[1]
    assert lines[2].endswith("# run the tests") and "pytest" in lines[2]


def test_readme_is_an_entry_point():
    words = len(README.read_text().split())  # as `wc -w` counts
    assert words <= MAX_README_WORDS, f"README.md has {words} words; reference belongs in docs/"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README does not list: {sorted(p.name for p in pages - linked)}"


def test_the_benchmarks_index_lists_every_report():
    index = ROOT / "docs" / "benchmarks.md"
    linked = {(index.parent / target.split("#")[0]).resolve() for target in links(index)}
    reports = {page.resolve() for page in (ROOT / "docs" / "benchmarks").glob("*.md")}
    assert not reports - linked, f"reports docs/benchmarks.md does not list: {sorted(p.name for p in reports - linked)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(page):
    problems = []
    for target in links(page):
        if URL.match(target) or target.startswith("//"):
            problems.append(f"{target}: a link outside the repository")
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif not file.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_addresses_outside_the_repository(page):
    """Prose names no web address; code shows placeholder addresses only (127.0.0.1, camera.local, ...)."""
    text = page.read_text()
    outside = URL.findall(prose(text))
    code = [u for u in URL.findall(text) if u not in outside]
    foreign = [u for u in code if not PLACEHOLDER_HOSTS.match(u.split("://", 1)[1])]
    assert not outside and not foreign, f"addresses outside the repository: {outside + foreign}"


# A file of the repository named in a page's text or code (`stream/questions.py`, `python benchmarks/soak.py`).
NAMED_FILE = re.compile(r"(?<![\w/.<(\[-])((?:emloc|stream|sinks|tests|configs|benchmarks|research|docs|\.ci)/"
                        r"[\w./-]*\.[a-z]+)\b")


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(page):
    """A file a page names (a module, a config, a benchmark script) exists: a moved file updates its docs.
    Benchmark reports are left out: their commands name the trees they measured (/tmp/before/...)."""
    missing = sorted({name for name in NAMED_FILE.findall(page.read_text()) if not (ROOT / name).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def shown_commands() -> list[tuple[str, str]]:
    """Every `emloc-stream ...` command in a code block of README.md and docs/*.md: (page, command)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        blocks = [m.group(0) for m in FENCE.finditer(text)]
        blocks += [m.group(0) for m in re.finditer(r"(?<=\n\n)" + INDENTED.pattern, FENCE.sub("", text), re.M)]
        for block in blocks:
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if line.startswith("emloc-stream "):
                    out.append((str(page.relative_to(ROOT)), line))
    return out


class Parsed(Exception):
    """Raised with the parsed arguments, so the command is checked without running it."""


@pytest.mark.parametrize("page,command", shown_commands())
def test_shown_commands_parse(page, command, monkeypatch):
    """The flags a page shows exist and take the values shown (optional parts in [brackets] left out)."""
    from stream.cli import main

    command = re.sub(r"\s#\s.*$", "", command)  # a trailing comment
    command = re.sub(r"\[[^\]]*\]", "", command)  # [--optional VALUE]
    argv = shlex.split(command)[1:]
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        try:
            main(argv)
        except SystemExit as exit_:
            pytest.fail(f"{page}: `{command}` is refused by the command line (exit {exit_.code})")
