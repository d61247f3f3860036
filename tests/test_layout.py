"""The layout's direction: what runs per request never imports the offline tools."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# entry points of the tools among the globbed files (speckv/cli/, the command line, is a package: not globbed)
TOOLING = {"deployments/bench_serving.py", "deployments/load_run.py", "deployments/load_sweep.py"}


def runtime_files() -> list[Path]:
    """speckv/ outside speckv/tools/, and the Serve deployments, less the tools' entry points."""
    files = [*(REPO / "speckv").glob("*.py"), *(REPO / "deployments").glob("*.py")]
    return sorted(f for f in files if str(f.relative_to(REPO)) not in TOOLING)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, relative imports resolved (function bodies included)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import tools`
    return names


def test_runtime_never_imports_the_offline_tools():
    files = runtime_files()
    assert len(files) > 15 and (REPO / "speckv" / "engine.py") in files
    offenders = {str(f.relative_to(REPO)): sorted(m for m in imported_modules(f) if m.startswith("speckv.tools"))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    """The check itself: a relative import inside a function counts."""
    probe = REPO / "speckv" / "_layout_probe.py"
    probe.write_text("def f():\n    from .tools.replay import replay\n")
    try:
        assert "speckv.tools.replay" in imported_modules(probe)
    finally:
        probe.unlink()
