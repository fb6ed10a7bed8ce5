"""Counts the suite's assertions (issue 31.6: no assertion removed while making the suite faster): `assert`
statements, pytest.raises / pytest.warns, and assert_* calls (torch.testing.assert_close, np.testing...), per
file and in all. `python tests/count_assertions.py [REV]` counts the working tree, or tests/ at a git revision."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def count(source: str) -> int:
    n = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assert):
            n += 1
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            n += name in ("raises", "warns") or name.startswith("assert_")
    return n


def sources(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {p.name: p.read_text() for p in sorted(TESTS.glob("*.py"))}
    root = TESTS.parent
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "tests/"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.split()
    return {Path(n).name: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=root, capture_output=True, text=True,
                                         check=True).stdout for n in names if n.endswith(".py")}


if __name__ == "__main__":
    counts = {name: count(text) for name, text in sources(sys.argv[1] if len(sys.argv) > 1 else None).items()}
    for name, n in counts.items():
        print(f"{n:5d}  {name}")
    print(f"{sum(counts.values()):5d}  total")
