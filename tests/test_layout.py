"""The README's Layout block names every module of the package, and nothing that is gone.

The expected set is read from the tree at test time, so a module added, moved or removed
without its Layout line fails here instead of leaving the README's map of the code stale.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "slimtune"
# an entry: a relative path ending in a file name or a folder's "/", then its description
ENTRY = re.compile(r"(?P<indent> *)(?P<name>[\w.-]+(?:/[\w.-]+)*(?:\.\w+|/))(?:\s+\S.*)?")
NOT_LISTED = {"__init__.py", "__main__.py"}


def layout_block(readme: str) -> str:
    """The first code block after the ``## Layout`` heading."""
    section = readme.split("\n## Layout\n", 1)
    assert len(section) == 2, "README has no '## Layout' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", section[1], re.S | re.M)
    assert block, "README's Layout section has no code block"
    return block.group(1)


def parse_layout(block: str) -> set[str]:
    """Repo-relative paths the block names ("pkg/" for a folder): one entry per line, a
    line's path is its name under the nearest less-indented folder entry above it."""
    paths: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, path) of the open folder entries
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        match = ENTRY.fullmatch(line.rstrip())
        assert match, (
            f"Layout line {number} is not 'name.py  what it holds' or 'name/  ...': {line!r}"
        )
        indent, name = len(match["indent"]), match["name"]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        assert path not in paths, f"Layout names {path} twice"
        paths.add(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def package_modules() -> set[str]:
    """Every module and package under src/slimtune, as the Layout block would name it."""
    found = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in path.parts or path.name in NOT_LISTED:
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            found.add(rel + "/")
        elif path.suffix == ".py":
            found.add(rel)
    return found


def test_parse_layout_nests_by_indentation():
    block = (
        "src/pkg/          the package\n"
        "  a.py            module a\n"
        "  sub/            a package\n"
        "    b.py          module b\n"
        "\n"
        "  c.py\n"
        "tests/            tests\n"
    )
    assert parse_layout(block) == {
        "src/pkg/",
        "src/pkg/a.py",
        "src/pkg/sub/",
        "src/pkg/sub/b.py",
        "src/pkg/c.py",
        "tests/",
    }
    with pytest.raises(AssertionError, match="line 2"):
        parse_layout("src/pkg/\n             a description that wrapped\n")
    with pytest.raises(AssertionError, match="twice"):
        parse_layout("pkg/\n  a.py\n  a.py\n")


def test_readme_layout_matches_the_tree():
    named = parse_layout(layout_block((ROOT / "README.md").read_text()))
    missing = sorted(package_modules() - named)
    assert not missing, f"README's Layout does not name: {missing}"
    gone = sorted(
        p for p in named if not (ROOT / p).exists() or p.endswith("/") != (ROOT / p).is_dir()
    )
    assert not gone, f"README's Layout names what is not in the tree: {gone}"


def _is_module(name: str) -> bool:
    base = Path(__file__).resolve().parents[1] / "src" / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path, package: str) -> set[str]:
    """The slimtune modules ``path`` imports (at any depth, lazy imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import mod" imports the module; "from pkg import name", the package
            found |= {
                f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target
                for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("slimtune")}


def test_no_import_cycle_between_modules():
    """Layering: no module imports, at any depth (lazy imports and package __init__ files
    included), one that imports it back."""
    root = Path(__file__).resolve().parents[1] / "src"
    modules: dict[str, Path] = {}
    for path in (root / "slimtune").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, trail: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep, [*trail, dep])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])
