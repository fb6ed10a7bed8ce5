"""Which source files a piece of the pipeline runs, from its imports: for the reference cache's code digest
(`logp_code`, recorded as a note: what makes a cache stale is pipeline/versions.py) and for the DVC stages'
code deps (stages/cli/dvcdeps.py derives them, tests/test_dvc_deps.py checks them).

Imports are read from the source (ast), including those inside functions, and followed within the
`pipeline` and `stages` packages; third-party modules are not followed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # holds pipeline/ and stages/
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The source file of a module of our packages (a package's __init__.py), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of our packages that `path` imports anywhere in its body (absolute names)."""
    stat = path.stat()
    return set(_imports_of(path, stat.st_mtime_ns, stat.st_size))


@functools.cache  # by the file's version: `dvcdeps` and its tests take ~40 closures a dvc.yaml, mostly of the same files
def _imports_of(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import sampling`
    return frozenset(m for m in found if module_file(m) is not None)


def closure(modules: Iterable[str], within: tuple[str, ...] | None = None) -> list[Path]:
    """Source files of `modules` and of everything they import from our packages, transitively (with the
    __init__.py of every package on the way, which Python runs too). `within`: follow only modules whose
    names start with one of these prefixes (e.g. the code on a computation's path, not its loaders)."""
    todo, seen = [m for m in modules], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None or (within is not None and not name.startswith(within)):
            continue
        files.add(path)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
        todo.extend(imports_of(path))
    return sorted(files)


def code_digest(modules: Iterable[str], within: tuple[str, ...] | None = None) -> dict[str, str]:
    """{file relative to the repository: sha256 of its bytes} for the closure of `modules` (see `closure`)."""
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in closure(modules, within)}
