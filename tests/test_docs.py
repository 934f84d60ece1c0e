"""README.md and docs/*.md: every relative link resolves (file, and `#anchor` = a GitHub heading slug), every
repository path and module they name exists, every docs/ file is reachable from the README, the README's
first two shell commands are `make demo` and `make test`, both Makefile targets, and docs/architecture.md
has a section per package and names every module file. Pure text: no TensorFlow."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ARCHITECTURE = REPO / "docs" / "architecture.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = tuple(sorted(p.parent.name for p in REPO.glob("*/__init__.py")))  # the top-level packages
FOLDERS = (*PACKAGES, "bench", "tests", "docs")
FILE_SUFFIXES = {"h5", "json", "jsonl", "txt", "py", "npz", "html", "md", "ckpt", "index", "jpg"}

_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")
_REPO_PATH = re.compile(rf"^(?:{'|'.join(FOLDERS)})/[\w./-]*$")
_MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+$")
_SHELLS = {"bash", "sh", "shell", "console", "zsh"}


def rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it (messages, test ids)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines with fenced blocks blanked out, [(info string, block lines)] in order)."""
    prose, blocks, fence, info, block = [], [], None, "", []
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence, info, block = match.group(1), match.group(2).lower(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((info, block))
            fence = None
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: link markup and code ticks dropped, lower-cased, every character but
    letters, digits, `_`, `-` and spaces removed, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every ATX heading of a markdown file (duplicates get -1, -2, ... as on GitHub)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def paragraphs(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each run of non-blank lines outside fenced blocks: code spans and links
    may wrap lines but never cross a blank line."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []
    for number, line in enumerate(prose, start=1):
        if not line.strip():
            continue
        if out and out[-1][0] + out[-1][1].count("\n") == number - 1:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    found = []
    for start, text in paragraphs(path):
        masked = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
        found += [(start + masked.count("\n", 0, m.start()), m.group(1)) for m in _LINK.finditer(masked)]
        for offset, line in enumerate(masked.split("\n")):
            ref = _REF_DEF.match(line)
            if ref:
                found.append((start + offset, ref.group(1)))
    return found


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside fenced blocks, plus `pkg.module.name` for every
    `from pkg.module import name, ...` line of the fenced python blocks (line number 0)."""
    spans = [(start + text.count("\n", 0, m.start()), " ".join(m.group(2).split()))
             for start, text in paragraphs(path) for m in _CODE_SPAN.finditer(text)]
    _, blocks = split_fences(path.read_text(encoding="utf-8"))
    for info, lines in blocks:
        for line in lines if info == "python" else []:
            match = re.match(r"\s*from ([\w.]+) import ([\w, ]+)", line)
            if match:
                spans += [(0, f"{match.group(1)}.{name.strip()}") for name in match.group(2).split(",")]
    return spans


def link_problem(source: Path, target: str) -> str | None:
    """Why a relative link of `source` does not resolve, or None (absolute URLs are not checked)."""
    if _SCHEME.match(target):
        return None
    raw_path, _, anchor = target.partition("#")
    dest = (source.parent / unquote(raw_path)).resolve() if raw_path else source
    if not dest.exists():
        return f"{rel(dest)} does not exist"
    if anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
        return f"{rel(dest)} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_relative_links_resolve(doc):
    problems = [f"{rel(doc)}:{n}: ({target}) -> {why}" for n, target in links(doc)
                if (why := link_problem(doc, target))]
    assert not problems, "\n".join(problems)


def module_problem(dotted: str) -> str | None:
    """Why `pkg.module.name` does not name a module of this repository (and a name it defines), or None."""
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return None  # a file name such as decoder.weights.h5
    path, module = REPO / parts[0], REPO / parts[0] / "__init__.py"
    for i, part in enumerate(parts[1:], start=1):
        if (path / part).is_dir():
            path, module = path / part, path / part / "__init__.py"
        elif (path / f"{part}.py").is_file():
            path, module = path / part, path / f"{part}.py"
        else:
            source = module.read_text(encoding="utf-8") if module.is_file() else ""
            if re.search(rf"\b{re.escape(part)}\b", source):
                return None
            return f"{'.'.join(parts[:i])} has no module or name {part}"
    return None


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_named_paths_and_modules_exist(doc):
    problems = []
    for n, span in code_spans(doc):
        if _REPO_PATH.match(span) and not (REPO / span).exists():
            problems.append(f"{rel(doc)}:{n}: `{span}` does not exist")
        elif _MODULE.match(span) and (why := module_problem(span)):
            problems.append(f"{rel(doc)}:{n}: `{span}`: {why}")
    assert not problems, "\n".join(problems)


def project_packages() -> list[str]:
    """Every package of the project, sub-packages included ("decoder/train"): folders with an __init__.py."""
    return sorted(rel(init.parent) for top in PACKAGES for init in (REPO / top).rglob("__init__.py"))


def module_files() -> list[str]:
    """Every module file of the project: the packages' .py files (but __init__.py), the top-level scripts
    (cli.py) and the benchmarks, as paths relative to the repository."""
    files = [f for top in PACKAGES for f in (REPO / top).rglob("*.py") if f.name != "__init__.py"]
    files += [*REPO.glob("*.py"), *(REPO / "bench").glob("*.py")]
    return sorted(rel(f) for f in files if "__pycache__" not in f.parts)


def heading_words(path: Path) -> set[str]:
    """The first word of every heading of a markdown file (e.g. "decoder/train/")."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    return {match.group(2).split()[0].rstrip(",") for line in prose if (match := _HEADING.match(line))}


def architecture_problems(path: Path) -> list[str]:
    """What docs/architecture.md (at `path`) misses: a package without its own section (a heading that
    starts with `pkg/`), a module file not named in a code span, a named path (a code span ending in .py or /)
    that does not exist."""
    spans = {span for _, span in code_spans(path)}
    headings = heading_words(path)
    problems = [f"no section for the package {p}/" for p in project_packages() if f"{p}/" not in headings]
    problems += [f"the module file {f} is not named" for f in module_files() if f not in spans]
    named = {s for s in spans | headings if " " not in s and s.endswith((".py", "/"))}
    problems += [f"`{s}` does not exist" for s in sorted(named) if not (REPO / s).exists()]
    return problems


def test_architecture_has_every_package_and_module_and_only_real_paths():
    assert len(project_packages()) >= 8 and "base" in PACKAGES and "decoder/train" in project_packages()
    assert "cli.py" in module_files() and "decoder/train/loop.py" in module_files()
    problems = architecture_problems(ARCHITECTURE)
    assert not problems, "docs/architecture.md: " + "; ".join(problems)


def test_architecture_check_catches_a_missing_module_and_a_stale_path(tmp_path):
    """The completeness check itself: a module file dropped from the page, a package section dropped, and a
    path that no longer exists are each reported."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    page = tmp_path / "architecture.md"
    page.write_text(text.replace("`beam/graph.py`", "`beam/gone.py`").replace("### decoder/infer/", "### x"),
                    encoding="utf-8")
    problems = architecture_problems(page)
    assert "the module file beam/graph.py is not named" in problems
    assert "`beam/gone.py` does not exist" in problems
    assert "no section for the package decoder/infer/" in problems


def test_readme_keeps_a_short_overview_and_links_the_architecture():
    """The file map lives in docs/architecture.md: the README names each package once in a short overview
    (no file-by-file tree) and links the page."""
    text = README.read_text(encoding="utf-8")
    _, blocks = split_fences(text)
    assert not any(lines and lines[0].startswith("cli.py") for _, lines in blocks), "a file tree in README"
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    assert ARCHITECTURE.resolve() in linked
    assert all(f"`{p}/`" in text for p in PACKAGES)


def test_every_doc_is_linked_from_the_readme():
    linked = {(README.parent / unquote(t.partition("#")[0])).resolve()
              for _, t in links(README) if not _SCHEME.match(t)}
    orphans = [rel(doc) for doc in DOC_FILES[1:] if doc.resolve() not in linked]
    assert not orphans, f"docs not linked from README.md: {orphans}"


def shell_commands(text: str) -> list[str]:
    """The commands of the fenced shell blocks, in order (comments and `$ ` prompts dropped)."""
    _, blocks = split_fences(text)
    commands = []
    for info, lines in blocks:
        if info not in _SHELLS:
            continue
        for line in lines:
            command = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ ")).strip()
            if command:
                commands.append(command)
    return commands


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.$()/ -]+?)\s*:(?![=:])", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def test_readme_starts_with_make_demo_and_make_test():
    first_two = shell_commands(README.read_text(encoding="utf-8"))[:2]
    assert sorted(first_two) == ["make demo", "make test"], first_two
    targets = makefile_targets()
    assert {"demo", "test"} <= targets, sorted(targets)


def test_slugs_and_links_follow_github_rules(tmp_path):
    """The checker itself: GitHub-style slugs, duplicates numbered, code and fenced blocks ignored."""
    page = tmp_path / "page.md"
    page.write_text("# Stage one: `extract` — once per image\n## Resume, kill -9, full disk\n## Notes\n"
                    "## Notes\n```\n# not a heading [x](missing.md)\n```\n"
                    "See [a](#notes-1), `[b](gone.md)`, [c](https://example.com/x) and [d](page.md#nope).\n"
                    "A `span that\nwraps [e](gone.md)` then [`g`](#notes) and `decoder/train/loop.py`.\n",
                    encoding="utf-8")
    assert anchors(page) == {"stage-one-extract--once-per-image", "resume-kill--9-full-disk", "notes",
                             "notes-1"}
    assert links(page) == [(8, "#notes-1"), (8, "https://example.com/x"), (8, "page.md#nope"), (10, "#notes")]
    assert code_spans(page)[-3:] == [(9, "span that wraps [e](gone.md)"), (10, "g"),
                                     (10, "decoder/train/loop.py")]
    assert [link_problem(page, t) for _, t in links(page)][:2] == [None, None]
    assert "no heading" in link_problem(page, "page.md#nope")
    assert "does not exist" in link_problem(page, "missing.md")
    assert module_problem("decoder.train.step.perplexity") is None
    assert module_problem("decoder.train.evaluate") is not None
    assert module_problem("decoder.weights.h5") is None
