"""Readers for the deployment files (docker-compose.yml, Dockerfile, .dockerignore, nginx and
Redis configuration) and the checks the tests apply to them.

Every check returns a list of problems (empty: fine), so that the tests can run each one both on
the repository's files and on a deliberately broken copy, which shows the check can fail.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REDIS_CONF = ROOT / "docker" / "redis.conf"
NGINX_CONF = ROOT / "docker" / "nginx.conf"
EXAMPLE_ENV = ROOT / "docker" / "example.env"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
BIN = Path(sys.executable).parent  # the venv running the tests: its memcast, hadolint, check-jsonschema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- compose


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$`` on every string of a
    loaded compose file, as `docker compose` would with ``env`` (default: nothing set)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, default = m.group("op"), m.group("default") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return current if current is not None else default
        if op in (":?", "?") and not current:
            raise KeyError(f"compose requires ${name}: {default}")
        return current or ""

    return _VAR.sub(one, value)


def variables_used(value: Any) -> set[str]:
    """Names of the variables a compose file interpolates."""
    if isinstance(value, dict):
        return set().union(*(variables_used(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(variables_used(v) for v in value), set())
    if isinstance(value, str):
        return {m.group("name") or m.group("bare") for m in _VAR.finditer(value) if m.group(0) != "$$"}
    return set()


def environment(service: Mapping[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def as_argv(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str
    read_only: bool
    type: str  # volume | bind | tmpfs


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """A service's volumes in either syntax (after interpolation)."""
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            kind = item.get("type", "volume")
            out.append(Mount(item.get("source"), item["target"], bool(item.get("read_only")), kind))
            continue
        parts = item.split(":")
        if len(parts) == 1:
            out.append(Mount(None, parts[0], False, "volume"))
            continue
        source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
        bind = source.startswith((".", "/", "~"))
        out.append(Mount(source, target, "ro" in mode.split(","), "bind" if bind else "volume"))
    return out


def builds_our_image(service: Mapping[str, Any]) -> bool:
    """Whether the service is built from this repository's Dockerfile."""
    build = service.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    return context == ROOT and build.get("dockerfile", "Dockerfile") == "Dockerfile"


def settings_env_names() -> set[str]:
    """The environment variables ``service.settings.Settings`` reads."""
    # Imported here, not skipped when missing: a missing settings module is a failure.
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        names.add((alias or f"{prefix}{name}").upper())
    return names


def app_serves_get(paths: list[str]) -> dict[str, bool]:
    """Whether the FastAPI app routes ``GET path`` to a handler, asked of its router the way a
    request would be (building the app does not run its lifespan: nothing is loaded)."""
    from starlette.routing import Match

    from service.app import create_app
    from service.settings import Settings

    routes = create_app(Settings()).router.routes
    out = {}
    for path in paths:
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "root_path": "",
            "query_string": b"",
            "headers": [],
        }
        out[path] = any(route.matches(scope)[0] == Match.FULL for route in routes)
    return out


def check_environment(compose: Mapping[str, Any], known: set[str]) -> list[str]:
    """Every MEMCAST_* a service sets, or the file interpolates, is a settings field."""
    problems = []
    for name, service in compose["services"].items():
        for key in environment(service):
            if key.startswith("MEMCAST_") and key not in known:
                problems.append(f"service {name} sets {key}, which Settings does not read")
    for var in sorted(variables_used(compose)):
        if var.startswith("MEMCAST_") and var not in known:
            problems.append(f"the compose file interpolates ${{{var}}}, which is not a setting")
    return problems


def check_volumes(compose: Mapping[str, Any]) -> list[str]:
    declared = set((compose.get("volumes") or {}).keys())
    problems = []
    for name, service in interpolate(compose)["services"].items():
        for m in mounts(service):
            if m.type == "volume" and m.source is not None and m.source not in declared:
                problems.append(
                    f"service {name} mounts volume {m.source!r}, not declared in top-level volumes"
                )
    return problems


def check_depends_on(compose: Mapping[str, Any]) -> list[str]:
    services = compose["services"]
    problems = []
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"service {name} depends on {dep!r}, which does not exist")
                continue
            if spec.get("condition") == "service_healthy":
                check = services[dep].get("healthcheck")
                if not check or check.get("disable") or not check.get("test"):
                    problems.append(
                        f"service {name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                    )
    return problems


def memcast_commands(compose: Mapping[str, Any], dockerfile: Dockerfile) -> dict[str, list[str]]:
    """The argv (after the ``memcast`` entry point) each service built from our image runs."""
    out = {}
    for name, service in interpolate(compose)["services"].items():
        if not builds_our_image(service):
            continue
        if "entrypoint" in service:
            argv = as_argv(service["entrypoint"])
            if not argv or Path(argv[0]).name != "memcast":
                out[name] = ["<entrypoint is not memcast>", *argv]
                continue
        out[name] = as_argv(service.get("command")) or dockerfile.final.exec_form("CMD")
    return out


def healthcheck_paths(compose: Mapping[str, Any]) -> dict[str, str]:
    """HTTP paths probed by compose healthchecks: an argument starting with '/' after the probe
    script, or the path of an http:// URL."""
    out = {}
    for name, service in compose["services"].items():
        test = (service.get("healthcheck") or {}).get("test")
        path = http_path_of(as_argv(test[1:]) if isinstance(test, list) else as_argv(test))
        if path is not None:
            out[name] = path
    return out


def http_path_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        url = re.match(r"https?://[^/\s]+(/\S*)", arg)
        if url:
            return url.group(1)
        if i > 0 and Path(argv[i - 1]).name == "healthcheck.py" and arg.startswith("/"):
            return arg
    if any(Path(a).name == "healthcheck.py" for a in argv):
        return "/healthz"  # the script's default
    return None


# ----------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def exec_form(self, keyword: str) -> list[str]:
        arg = self.last(keyword)
        if arg is None:
            return []
        arg = re.sub(r"^(--\S+\s+)*", "", arg) if keyword != "HEALTHCHECK" else arg
        return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def healthcheck_argv(self) -> list[str]:
        hc = self.final.last("HEALTHCHECK") or ""
        m = re.search(r"\bCMD\s+(.*)$", hc, re.S)
        if m is None:
            return []
        cmd = m.group(1).strip()
        return json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)

    def env(self, stage: Stage) -> dict[str, str]:
        out = {}
        for arg in stage.all("ENV"):
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, rest = logical.strip().partition(" ")
            yield keyword.upper(), rest.strip()
        logical = ""


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m is not None, rest
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(base=base, name=m.group(2)))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


# ----------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (moby/patternmatcher: Go filepath.Match plus '**')."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


@dataclass
class DockerIgnore:
    rules: list[tuple[bool, re.Pattern[str]]]  # (negated, pattern), in file order

    @classmethod
    def read(cls, path: Path = DOCKERIGNORE) -> DockerIgnore:
        rules = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = pattern.lstrip("/").rstrip("/") or "."
            rules.append((negated, _pattern_regex(pattern)))
        return cls(rules)

    def excluded(self, path: str) -> bool:
        """Whether the file at ``path`` (relative to the context) stays out of it: the last rule
        that matches the path or one of its parent directories wins."""
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negated, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negated
        return result


def copy_sources(dockerfile: Dockerfile) -> list[str]:
    """Paths COPY/ADD take from the build context (not from another stage)."""
    out = []
    for stage in dockerfile.stages:
        for keyword, arg in stage.instructions:
            if keyword not in ("COPY", "ADD") or "--from=" in arg:
                continue
            argv = [
                a
                for a in (json.loads(arg) if arg.startswith("[") else shlex.split(arg))
                if not a.startswith("--")
            ]
            out.extend(argv[:-1])
    return out


# ----------------------------------------------------------------------------- configs


def redis_directives(path: Path = REDIS_CONF) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, *values = shlex.split(line)
            out[key.lower()] = values
    return out


def nginx_directives(path: Path = NGINX_CONF) -> list[tuple[str, list[str]]]:
    """Flat (name, args) of every simple directive, comments removed."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    out = []
    for statement in re.split(r"[;{}]", text):
        tokens = statement.split()
        if tokens:
            out.append((tokens[0], tokens[1:]))
    return out


def parse_size(value: str) -> int:
    """nginx / Redis sizes: 8m, 1gb, 512k, 1024."""
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", value.strip().lower())
    if m is None:
        raise ValueError(value)
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)]
