"""The package layering, read from the source with ``ast``: a change that makes the server
depend on the trainer (or the models on anything of ours) fails here, not in a review.

::

    memcast (the command, the client, the harness)
      ├── service ──┐
      └── trainer ──┴── models (pure PyTorch, no I/O)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "trainer", "service", "memcast", "bench")
# package -> the project packages it may import (itself aside)
ALLOWED = {
    "models": set(),
    "service": {"models"},
    "trainer": {"models"},
    "memcast": {"models", "service", "trainer"},
    "bench": {"models", "service", "trainer", "memcast"},
}


def import_graph() -> dict[str, set[str]]:
    """package -> the other project packages its modules import (lazily imported ones too)."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                graph[package] |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES} - {package}
    return graph


def test_packages_import_only_the_layers_below_them() -> None:
    graph = import_graph()
    extra = {package: sorted(graph[package] - ALLOWED[package]) for package in PACKAGES}
    assert all(not v for v in extra.values()), f"imports against the layering: {extra}"


def test_the_check_sees_an_import_against_the_layering(tmp_path: Path) -> None:
    """Guard of the guard: the parser finds a lazy import inside a function."""
    tree = ast.parse("def f():\n    from trainer.data import read_frame\n")
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["trainer.data"]


def test_the_server_starts_without_the_training_stack() -> None:
    """Importing the app loads neither the trainer nor pandas or matplotlib (the API image does
    not install them)."""
    code = (
        "import sys, service.app, service.cli;"
        "bad = sorted(m for m in ('trainer', 'pandas', 'matplotlib') if m in sys.modules);"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the server imported {result.stdout.strip()}"


def test_the_command_without_the_training_stack_serves_and_explains(tmp_path: Path) -> None:
    """The API image installs no pandas: `memcast serve --help` works and `memcast pretrain` says
    what to install, in one line with exit code 2."""
    blocker = tmp_path / "sitecustomize.py"
    # None in sys.modules: `import pandas` raises ModuleNotFoundError, find_spec says absent
    blocker.write_text("import sys\nsys.modules.update(pandas=None, matplotlib=None, tqdm=None)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}

    def memcast(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "memcast.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )

    assert memcast("serve", "--help").returncode == 0
    result = memcast("pretrain", "--data", "x.csv")
    assert result.returncode == 2, result.stderr
    assert "pip install 'memcast[train]'" in result.stderr and "Traceback" not in result.stderr
