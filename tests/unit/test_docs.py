"""The docs name files and code that exist: docs/architecture.md's module tables and its
extension points, the README's layout block, and every ``.py`` file or dotted module name the
READMEs and docs/*.md cite, checked against the tree, so a rename that forgets the docs fails."""

from __future__ import annotations

import ast
import builtins
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "layers/tierserve/python"
PACKAGE = LIBRARY / "tierserve"
ARCHITECTURE = REPO / "docs/architecture.md"
README = REPO / "README.md"
DOCS = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "bench/README.md",
    REPO / "examples/minilm/README.md",
]
SOURCE_DIRS = ("layers", "infra", "functions", "bench", "tests")
# Never in a checkout, or not ours: what these docs may name without it existing here.
WRITTEN_BY_RUNS = (".tierserve/", "bench/results/", "catalog.json")  # gitignored outputs
ELSEWHERE = {"tests/aws/services/apigateway/test_apigateway_lambda.py"}  # LocalStack's, cited
SKIPPED_DIRS = {".git", ".venv", "node_modules", "cdk.out", ".tierserve", "build", "__pycache__"}

BACKTICKED = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w.*-]+(?:/[\w.*-]+)*/?$")
FILE_SUFFIXES = (".py", ".md", ".json", ".txt", ".toml", ".sh", ".dockerignore")
DOTTED = re.compile(r"\b(?:tierserve|infra|bench)(?:\.\w+)+")
MEMBER = re.compile(r"^([A-Z]\w*)\.(\w+)$")
IDENTIFIER = re.compile(r"^(?:[A-Z]\w*|_?[a-z][a-z0-9]*(?:_[a-z0-9]+)+|__\w+__)$")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole line) up to the next heading of its level or above."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if re.match(rf"^#{{1,{level}}} ", lines[i]) and not lines[i].startswith("#" * (level + 1))
        ),
        len(lines),
    )
    return "\n".join(lines[start + 1 : end])


def backticked(text: str) -> list[str]:
    return [m.group(1).strip() for m in BACKTICKED.finditer(text)]


def is_path(token: str) -> bool:
    name = token.rstrip("/").rsplit("/", 1)[-1]
    return bool(PATH.match(token)) and ("/" in token or name.endswith(FILE_SUFFIXES) or name == "Dockerfile")


def written_by_runs(token: str) -> bool:
    return token.startswith(WRITTEN_BY_RUNS)


def exists(base: Path, token: str) -> bool:
    return any(base.glob(token.rstrip("/"))) if "*" in token else (base / token).exists()


@functools.cache
def repository_files() -> tuple[str, ...]:
    found = []
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO)
        if path.is_file() and not SKIPPED_DIRS.intersection(relative.parts[:-1]):
            found.append(relative.as_posix())
    return tuple(found)


def parsed_sources() -> Iterator[ast.Module]:
    for name in repository_files():
        if name.endswith(".py") and (name.startswith(SOURCE_DIRS) or "/" not in name):
            yield ast.parse((REPO / name).read_text(), name)


def defined_in(body: Iterable[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: functions, classes, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, ast.If | ast.Try):
            names.update(defined_in([*node.body, *getattr(node, "orelse", [])]))
    return names


@functools.cache
def code_names() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """Every name the sources define or hold as a string, and each class's members."""
    names: set[str] = set(dir(builtins))
    members: dict[str, set[str]] = {}
    for tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name | ast.arg):
                names.add(node.id if isinstance(node, ast.Name) else node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
            if isinstance(node, ast.ClassDef):
                members.setdefault(node.name, set()).update(defined_in(node.body))
    return frozenset(names), {k: frozenset(v) for k, v in members.items()}


def module_file(parts: list[str]) -> Path | None:
    root = LIBRARY if parts[0] == "tierserve" else REPO
    path = root.joinpath(*parts)
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return path if path.is_dir() else None


def resolves(dotted: str) -> bool:
    """``tierserve.routes.Router.serve``: a module (the longest prefix that is one), then names
    defined in it, then members of the class before them."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        found = module_file(parts[:i])
        if found is not None:
            break
    else:
        return False
    rest = parts[i:]
    if not rest:
        return True
    if found.is_dir():  # a namespace package: only submodules, already tried
        return False
    body: list[ast.stmt] = ast.parse(found.read_text()).body
    for name in rest:
        node = defined_in(body).get(name)
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


def stale(tokens: Iterable[str], base_for: Callable[[str], Path] = lambda token: REPO) -> list[str]:
    """The tokens that name nothing under their base folder (outputs of runs excepted)."""
    return [t for t in tokens if not written_by_runs(t) and not exists(base_for(t), t)]


# ---------------------------------------------------------------- the module tables


def table_names(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def children(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if (p.suffix == ".py" and p.is_file())
        or (p.is_dir() and p.name != "__pycache__" and any(p.rglob("*.py")))
    )


def uncovered(folder: Path, named: set[Path]) -> list[str]:
    """Entries of ``folder`` that ``named`` does not name: a folder counts as named when it is,
    or when each of its own entries is."""
    missing = []
    for child in children(folder):
        if child in named:
            continue
        if child.is_dir() and not uncovered(child, named):
            continue
        missing.append(child.relative_to(REPO).as_posix() + ("/" if child.is_dir() else ""))
    return missing


def architecture_modules() -> list[str]:
    return table_names(section(ARCHITECTURE.read_text(), "## The core library"))


def test_every_module_the_architecture_tables_name_exists():
    names = architecture_modules()
    assert len(names) > 20
    assert stale(names, lambda token: PACKAGE) == []


def test_the_architecture_tables_name_every_module_of_the_package():
    named = {(PACKAGE / name.rstrip("/")) for name in architecture_modules()}
    assert uncovered(PACKAGE, named) == [], "add a row to docs/architecture.md's module tables"


# ---------------------------------------------------------------- the extension points


def extension_points() -> str:
    return section(ARCHITECTURE.read_text(), "## Extension points")


def test_the_extension_points_keep_each_code_span_on_one_line():
    """A span broken over two lines would pair every later backtick wrongly, and hide names."""
    assert [line for line in extension_points().splitlines() if line.count("`") % 2] == []


def test_every_file_the_extension_points_name_exists():
    paths = [t for t in backticked(extension_points()) if is_path(t)]
    assert len(paths) > 40
    assert stale(paths, lambda token: LIBRARY if token.startswith("tierserve/") else REPO) == []


def test_every_name_the_extension_points_cite_is_in_the_code():
    tokens = backticked(extension_points())
    names, members = code_names()
    dotted = [t for t in tokens if DOTTED.fullmatch(t)]
    assert [t for t in dotted if not resolves(t)] == []
    cited = [m.groups() for t in tokens if (m := MEMBER.match(t)) and not DOTTED.fullmatch(t)]
    assert [f"{c}.{m}" for c, m in cited if m not in members.get(c, ())] == []
    identifiers = [t for t in tokens if IDENTIFIER.match(t)]
    assert len(identifiers) > 40
    assert [t for t in identifiers if t not in names] == []


def test_the_extension_points_cover_what_the_issue_asked_for():
    headings = re.findall(r"^### (.+)$", extension_points(), flags=re.MULTILINE)
    for kind in (
        "input format",
        "route",
        "execution provider",
        "tier",
        "context key",
        "environment variable",
        "benchmark",
    ):
        assert any(kind in heading for heading in headings), kind


# ---------------------------------------------------------------- the README's layout


def layout_entries() -> list[Path]:
    """Each name of the README's layout block, resolved against the folder line above it."""
    block = section(README.read_text(), "## Layout").split("```")[1]
    parents: list[tuple[int, Path]] = []
    entries = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent >= 20:  # a description's second line
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        base = parents[-1][1] if parents else REPO
        pieces = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(", ")
        for piece in pieces:
            assert PATH.match(piece), f"{piece!r} in the README's layout is not a path"
            entries.append(base / piece)
        if pieces[-1].endswith("/"):
            parents.append((indent, base / pieces[-1]))
    return entries


def test_every_name_in_the_readme_layout_exists():
    names = [entry.relative_to(REPO).as_posix() for entry in layout_entries()]
    assert len(names) > 50
    assert stale(names) == []


@pytest.mark.parametrize("folder", ["layers/tierserve/python/tierserve", "infra", "functions", "tests"])
def test_the_readme_layout_names_every_module(folder):
    named = set(layout_entries())
    missing = uncovered(REPO / folder, named)
    assert [m for m in missing if not m.endswith("/__init__.py") and not m.endswith("conftest.py")] == []


# ---------------------------------------------------------------- every doc


def test_every_python_file_the_docs_name_exists():
    files = repository_files()
    cited = {
        (doc.name, token)
        for doc in DOCS
        for token in re.findall(r"(?<![\w/.-])[\w.-]+(?:/[\w.-]+)*\.py\b", doc.read_text())
    }
    missing = [
        f"{doc}: {token}"
        for doc, token in sorted(cited)
        if token not in ELSEWHERE and not any(f == token or f.endswith("/" + token) for f in files)
    ]
    assert missing == []


def test_every_module_the_docs_name_by_its_dotted_name_exists():
    cited = {
        (doc.name, m) for doc in DOCS for span in backticked(doc.read_text()) for m in DOTTED.findall(span)
    }
    assert [f"{doc}: {name}" for doc, name in sorted(cited) if not resolves(name)] == []
