"""Every module of emloc/, stream/ and sinks/ is exercised by the tests that ran: one of its functions ran (an
import alone runs the `def` lines, which proves nothing), or, for a module without functions, it was imported.
Run after a tier with coverage, from the repository root; the fast tier must pass it:

    python -m pytest -m "not slow" --cov && python tests/check_coverage.py

(pytest-cov's report gives each module's share of lines run.) Exits 1 naming the modules no test reached. A
module whose import needs an optional extra that is not installed (stream/lmms_eval_model.py without lmms-eval)
is named apart and not counted: the tests of it skip too."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emloc", "stream", "sinks")
OPTIONAL = {"stream/lmms_eval_model.py": "lmms_eval"}  # module -> the optional package its import needs


def function_lines(path: Path) -> set[int]:
    """The lines of statements inside functions, which run only when a function is called (not the lines of
    `def` and `class` statements and their decorators, which an import runs)."""
    tree = ast.parse(path.read_text())
    inside, defined = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.update(range(min([node.lineno] + [d.lineno for d in node.decorator_list]), node.body[0].lineno))
            defined.add(node.lineno)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(sub.lineno for stmt in node.body for sub in ast.walk(stmt) if isinstance(sub, ast.stmt))
    return inside - defined


def main() -> int:
    data_file = ROOT / ".coverage"
    if not data_file.is_file():
        print(f"no coverage data at {data_file}: run pytest with --cov first", file=sys.stderr)
        return 2
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    measured = {Path(name).resolve(): set(data.lines(name) or ()) for name in data.measured_files()}
    unreached, skipped = [], []
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            skipped.append(f"{name} (needs {OPTIONAL[name]}, not installed)")
            continue
        ran, functions = measured.get(path.resolve(), set()), function_lines(path)
        reached = bool(ran & functions) if functions else bool(ran) or not path.read_text().strip()
        if not reached:
            unreached.append(name)
    for name in skipped:
        print(f"not counted: {name}")
    if unreached:
        print(f"{len(unreached)} module(s) no test reached: {', '.join(unreached)}", file=sys.stderr)
        return 1
    print(f"every module reached ({len(skipped)} skipped for a missing optional extra)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
