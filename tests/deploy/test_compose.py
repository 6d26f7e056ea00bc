"""docker-compose.yml, read without Docker: structure, settings, volumes, health, commands."""

from __future__ import annotations

import copy
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.deploy import _deploy as d


@pytest.fixture(scope="module")
def compose() -> dict:
    return d.load_compose()


@pytest.fixture(scope="module")
def dockerfile() -> d.Dockerfile:
    return d.parse_dockerfile()


@pytest.fixture(scope="module")
def known_env() -> set[str]:
    return d.settings_env_names()


def test_compose_parses_with_the_expected_services(compose):
    assert set(compose["services"]) >= {"redis", "api", "proxy", "pretrain"}
    assert compose["services"]["pretrain"].get("profiles") == ["train"]
    for name in ("redis", "api", "proxy"):
        assert not compose["services"][name].get("profiles"), (
            f"{name} must start with a plain `docker compose up`"
        )


def test_compose_validates_against_compose_spec():
    result = subprocess.run(
        [str(d.BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(d.COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_validation_rejects_a_broken_file(tmp_path, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"  # not a condition
    path = tmp_path / "docker-compose.yml"
    path.write_text(d.yaml.safe_dump(broken))
    result = subprocess.run(
        [str(d.BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_memcast_environment_variables_are_settings(compose, dockerfile, known_env):
    assert d.check_environment(compose, known_env) == []
    image_env = {k for k in dockerfile.env(dockerfile.final) if k.startswith("MEMCAST_")}
    assert image_env <= known_env, f"Dockerfile ENV not read by Settings: {sorted(image_env - known_env)}"
    example = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in d.EXAMPLE_ENV.read_text().splitlines()
        if "=" in line and line.lstrip("# ").startswith("MEMCAST_")
    }
    assert example, "docker/example.env lists no MEMCAST_ setting"
    assert example <= known_env, f"docker/example.env names unknown settings: {sorted(example - known_env)}"


def test_example_env_lists_every_variable_the_compose_file_reads(compose):
    listed = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in d.EXAMPLE_ENV.read_text().splitlines()
        if re.match(r"#?\s*[A-Z][A-Z0-9_]*=", line)
    }
    passed_through = {
        k for s in compose["services"].values() for k, v in d.environment(s).items() if v is None
    }
    build_args = set(compose["x-memcast-build"]["args"])
    missing = (d.variables_used(compose) | passed_through | build_args) - listed
    assert missing == set(), f"docker/example.env does not mention {sorted(missing)}"


def test_environment_check_flags_an_unknown_variable(compose, known_env):
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["environment"]["MEMCAST_REDIS_HOST"] = "redis"  # not a setting
    assert d.check_environment(broken, known_env) == [
        "service api sets MEMCAST_REDIS_HOST, which Settings does not read"
    ]


def test_named_volumes_are_declared(compose):
    assert d.check_volumes(compose) == []
    used = {
        m.source
        for s in d.interpolate(compose)["services"].values()
        for m in d.mounts(s)
        if m.type == "volume"
    }
    assert used == {"redis-data", "checkpoints"}


def test_volume_check_flags_an_undeclared_volume(compose):
    broken = copy.deepcopy(compose)
    del broken["volumes"]["checkpoints"]
    assert len(d.check_volumes(broken)) == 2  # api and pretrain


def test_healthy_dependencies_have_healthchecks(compose):
    assert d.check_depends_on(compose) == []
    assert compose["services"]["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_depends_on_check_flags_a_missing_healthcheck(compose):
    broken = copy.deepcopy(compose)
    del broken["services"]["redis"]["healthcheck"]
    assert d.check_depends_on(broken) == [
        "service api waits for redis to be healthy, but redis has no healthcheck"
    ]


def _help(subcommand: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(d.BIN / "memcast"), subcommand, "--help"], capture_output=True, text=True, timeout=150
    )


def test_services_run_real_memcast_subcommands(compose, dockerfile):
    from memcast.cli import build_parser

    commands = d.memcast_commands(compose, dockerfile)
    assert set(commands) >= {"api", "pretrain"}
    commands["<Dockerfile CMD>"] = dockerfile.final.exec_form("CMD")
    subcommands = sorted({argv[0] for argv in commands.values()})
    with ThreadPoolExecutor(len(subcommands)) as pool:  # each start imports torch: run them together
        helps = dict(zip(subcommands, pool.map(_help, subcommands), strict=True))
    for service, argv in commands.items():
        result = helps[argv[0]]
        assert result.returncode == 0, f"{service}: `memcast {argv[0]} --help` failed: {result.stderr}"
        # the whole command line, options included, must parse (without running it)
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{service}: `memcast {' '.join(argv)}` does not parse (exit {exc.code})")


def test_a_command_that_is_not_a_subcommand_fails(capsys):
    from memcast.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["server"])
    assert exc.value.code == 2 and "invalid choice: 'server'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--data", "/data/x.csv", "--output", "/checkpoints/x"])


def test_api_scales_behind_the_proxy(compose, dockerfile):
    api, proxy = compose["services"]["api"], compose["services"]["proxy"]
    assert "container_name" not in api and "ports" not in api, "a fixed name or host port breaks --scale"
    assert len(proxy["ports"]) == 1
    port = dockerfile.env(dockerfile.final)["MEMCAST_PORT"]
    assert "MEMCAST_PORT" not in d.environment(api), "the proxy and the healthcheck expect the image's port"
    assert [str(p) for p in api.get("expose", [])] == [port]
    passes = [args for name, args in d.nginx_directives() if name == "set" and "$memcast_api" in args]
    assert passes == [["$memcast_api", f"http://api:{port}"]], "nginx must reach `api` on the image's port"
    assert ("proxy_pass", ["$memcast_api"]) in d.nginx_directives(), (
        "a variable proxy_pass re-resolves replicas"
    )
    resolvers = [args for name, args in d.nginx_directives() if name == "resolver"]
    assert resolvers and resolvers[0][0] == "127.0.0.11", "Docker's embedded DNS"


def test_proxy_accepts_the_bodies_the_api_accepts():
    from service.settings import Settings

    sizes = [args[0] for name, args in d.nginx_directives() if name == "client_max_body_size"]
    assert sizes and d.parse_size(sizes[0]) > Settings().max_body_bytes


@pytest.mark.parametrize(
    "env", [{}, {"MEMCAST_CHECKPOINT_DIR": "/srv/models", "MEMCAST_DEFAULT_MODEL": "v2"}]
)
def test_checkpoints_flow_from_pretrain_to_api(compose, env):
    services = d.interpolate(compose, env)["services"]
    api, pretrain = services["api"], services["pretrain"]
    ckpt_dir = d.environment(api)["MEMCAST_CHECKPOINT_DIR"]
    assert ckpt_dir == env.get("MEMCAST_CHECKPOINT_DIR", "/checkpoints")
    api_mounts = {m.target: m for m in d.mounts(api)}
    assert api_mounts[ckpt_dir].source == "checkpoints" and api_mounts[ckpt_dir].read_only
    train_mounts = {m.target: m for m in d.mounts(pretrain)}
    assert train_mounts[ckpt_dir].source == "checkpoints" and not train_mounts[ckpt_dir].read_only
    argv = d.as_argv(pretrain["command"])
    out = argv[argv.index("--out") + 1]
    assert out == f"{ckpt_dir}/{env.get('MEMCAST_DEFAULT_MODEL', 'default')}", "api serves it under that name"
    data = [m for m in d.mounts(pretrain) if m.target == "/data"]
    assert data and data[0].type == "bind" and data[0].read_only


def test_redis_persists_and_never_evicts(compose):
    redis = d.interpolate(compose)["services"]["redis"]
    conf = d.redis_directives()
    assert conf["appendonly"] == ["yes"]
    assert conf["appendfsync"] == ["everysec"]
    assert conf["maxmemory-policy"] == ["noeviction"]
    argv = d.as_argv(redis["command"])
    targets = {m.target: m for m in d.mounts(redis)}
    assert targets[argv[1]].source == "./docker/redis.conf", "redis must run with the repository's redis.conf"
    data_dir = argv[argv.index("--dir") + 1]
    assert targets[data_dir].source == "redis-data", "Redis must write its AOF into the named volume"
    assert "--appendonly" not in argv and "--maxmemory-policy" not in argv, "the file is the one source"
    assert d.parse_size(argv[argv.index("--maxmemory") + 1]) > 0
    assert "redis-cli ping" in " ".join(d.as_argv(redis["healthcheck"]["test"]))
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")


def test_images_are_pinned_by_tag(compose):
    for name, service in d.interpolate(compose)["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_healthcheck_paths_are_routes(compose, dockerfile):
    paths = d.healthcheck_paths(compose)
    paths["<Dockerfile HEALTHCHECK>"] = d.http_path_of(dockerfile.healthcheck_argv()) or "<none>"
    assert paths["api"] == "/readyz" and paths["proxy"] == "/healthz"
    assert paths["<Dockerfile HEALTHCHECK>"] == "/healthz"
    served = d.app_serves_get(sorted(set(paths.values())))
    assert [f"{where} probes {path}" for where, path in paths.items() if not served[path]] == []


def test_route_check_rejects_an_unknown_path():
    assert d.app_serves_get(["/health", "/v1/streams/x/forecast"]) == {
        "/health": False,
        "/v1/streams/x/forecast": True,
    }
