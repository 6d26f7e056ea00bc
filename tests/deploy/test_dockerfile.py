"""The Dockerfile and .dockerignore, read without Docker, and the container health probe."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from tests.deploy import _deploy as d


@pytest.fixture(scope="module")
def dockerfile() -> d.Dockerfile:
    return d.parse_dockerfile()


def _hadolint(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(d.BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=120
    )


def test_dockerfile_passes_hadolint():
    result = _hadolint(d.DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n"
    )
    assert _hadolint(bad).returncode != 0


def test_dockerfile_is_multistage_on_python_slim(dockerfile):
    assert len(dockerfile.stages) >= 2
    for stage in dockerfile.stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    final = dockerfile.final
    assert any("--from=builder" in arg and "/opt/venv" in arg for arg in final.all("COPY"))


def test_final_stage_has_no_compilers_or_build_steps(dockerfile):
    final = " ".join(dockerfile.final.all("RUN"))
    for word in ("apt-get install", "gcc", "build-essential", "pip install", "pip wheel"):
        assert word not in final, f"the final stage runs {word!r}"
    assert [kw for kw, _ in dockerfile.final.instructions if kw == "ADD"] == []


def test_torch_comes_from_the_cpu_index_by_default(dockerfile):
    builder = dockerfile.stages[0]
    assert builder.all("ARG") == ["TORCH_INDEX=https://download.pytorch.org/whl/cpu", 'EXTRAS=""']
    run = " ".join(builder.all("RUN"))
    assert '--index-url "${TORCH_INDEX}"' in run and "--no-deps" in run
    assert "--constraint /tmp/constraints.txt" in run and "grep -v '^torch=='" in run
    assert "pip check" in run


def test_torch_pins_agree(dockerfile):
    """The build installs torch==<constraints' version without its local label>; the project
    requires torch==<pyproject's>: they must be the same release or the build fails."""
    builder_run = " ".join(dockerfile.stages[0].all("RUN"))
    sed = re.search(r"sed -n '(s/[^']*/p)' constraints\.txt", builder_run)
    assert sed is not None, "the Dockerfile no longer reads the torch pin from constraints.txt"
    out = subprocess.run(
        ["sed", "-n", sed.group(1), str(d.ROOT / "constraints.txt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    project = tomllib.loads((d.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [r for r in project if re.match(r"torch\b", r)]
    assert torch_req == [f"torch=={out}"], (torch_req, out)


def test_entrypoint_user_and_healthcheck(dockerfile):
    final = dockerfile.final
    assert final.exec_form("ENTRYPOINT") == ["memcast"]
    assert final.exec_form("CMD") == ["serve"]
    user = final.last("USER")
    assert user is not None and user.split(":")[0] not in ("0", "root")
    # USER comes after the last RUN and COPY that need root
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    argv = dockerfile.healthcheck_argv()
    assert argv[0] == "python" and argv[1] == "/opt/memcast/healthcheck.py"
    assert any("docker/healthcheck.py /opt/memcast/healthcheck.py" in a for a in final.all("COPY"))
    env = dockerfile.env(final)
    assert env["MEMCAST_HOST"] == "0.0.0.0" and env["MEMCAST_CHECKPOINT_DIR"] == "/checkpoints"
    assert "chown memcast:memcast /checkpoints" in " ".join(final.all("RUN"))


CONTEXT_OUT = [
    ".git/HEAD",
    ".venv/bin/python",
    "data/ETTh1.csv",
    "checkpoints/default/model.safetensors",
    "runs/2024/report.json",
    ".env",
    "tests/deploy/test_compose.py",
    "service/__pycache__/app.cpython-311.pyc",
    "models/weights.safetensors",
    "docker-compose.yml",
]
CONTEXT_IN = ["pyproject.toml", "constraints.txt", "README.md", "memcast/cli.py", "service/settings.py"]


def test_dockerignore_keeps_data_and_history_out():
    ignore = d.DockerIgnore.read()
    assert [p for p in CONTEXT_OUT if not ignore.excluded(p)] == []
    assert [p for p in CONTEXT_IN if ignore.excluded(p)] == []


def test_every_copy_source_reaches_the_context(dockerfile):
    ignore = d.DockerIgnore.read()
    sources = d.copy_sources(dockerfile)
    assert "docker/healthcheck.py" in sources
    for source in sources:
        path = d.ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        assert files, source
        kept_out = [str(f.relative_to(d.ROOT)) for f in files if ignore.excluded(str(f.relative_to(d.ROOT)))]
        assert kept_out == [], f"COPY {source}, but .dockerignore excludes {kept_out[:3]}"


def test_every_packaged_package_is_copied(dockerfile):
    find = tomllib.loads((d.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {s.rstrip("/") for s in d.copy_sources(dockerfile)}
    for pattern in find["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"pyproject ships {pattern} but the Dockerfile does not COPY {package}/"


def test_dockerignore_matcher_follows_last_rule(tmp_path):
    path = tmp_path / ".dockerignore"
    path.write_text("*\n!keep\n**/*.pyc\n")
    ignore = d.DockerIgnore.read(path)
    assert ignore.excluded("other/x.py") and ignore.excluded("keep/__pycache__/a.pyc")
    assert not ignore.excluded("keep/a.py")


def test_healthcheck_script_fails_when_nothing_listens():
    result = subprocess.run(
        [sys.executable, str(d.HEALTHCHECK_SCRIPT), "/healthz"],
        env={"MEMCAST_PORT": str(d.free_port())},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy:")


def test_api_image_requirements_leave_out_the_training_stack():
    """The default build (EXTRAS empty) installs no pandas, tqdm or matplotlib; EXTRAS=train adds
    exactly pyproject's train group; an unknown group stops the build."""
    script = d.ROOT / "docker" / "requirements.py"

    def names(extras: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, str(script), extras], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return {re.split(r"[<>=\[ ]", line)[0].lower() for line in out.stdout.split()}

    project = tomllib.loads((d.ROOT / "pyproject.toml").read_text())["project"]
    api, train = names(""), names("train")
    assert not api & {"pandas", "tqdm", "matplotlib"} and "torch" in api and "fastapi" in api
    assert train - api == {re.split(r"[<>=]", r)[0] for r in project["optional-dependencies"]["train"]}
    bad = subprocess.run([sys.executable, str(script), "trian"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "trian" in bad.stderr
