"""Print the requirements of the image being built, one per line: pyproject.toml's core
dependencies plus those of the optional groups named in ``argv[1]`` (comma-separated, e.g.
``train``). The builder installs them against constraints.txt before the project's wheel.

    python docker/requirements.py train > /tmp/requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = [g.strip() for g in extras.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(project.get("optional-dependencies", {})))
    if unknown:
        raise SystemExit(f"EXTRAS names no optional dependency group of {pyproject}: {unknown}")
    return list(project["dependencies"]) + [r for g in groups for r in project["optional-dependencies"][g]]


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    pyproject = (
        here / "pyproject.toml" if (here / "pyproject.toml").exists() else here.parent / "pyproject.toml"
    )
    sys.stdout.write("\n".join(requirements(pyproject, sys.argv[1] if len(sys.argv) > 1 else "")) + "\n")
