"""Static checks of the container deployment: Dockerfile, .dockerignore, docker-compose.yml and
the example store config it mounts (cluster/store.example.toml). No Docker engine is needed;
`docker compose config` runs only where the compose plugin is installed.

Run: .venv/bin/python -m pytest tests/test_compose.py -q
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from memstore.cli import main as cli
from memstore.spec import TableSpec

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Subcommands the compose file may run before they land in memstore.cli.main.SUBCOMMANDS.
PLANNED = {"up", "down", "ls", "health", "train"}
SERVICES = {"ray-head", "memory-1", "memory-2", "memstore-up", "trainer"}
MEMORY_NODES = ("memory-1", "memory-2")
RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min/max-worker-port


# ---------------------------------------------------------------------------------------------
# Parsing helpers


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value):
    """Compose's variable substitution with every variable unset: ${X:-default} -> default."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(2) and m.group(2).endswith("?"):
            raise AssertionError(f"{m.group(0)} requires a variable to be set")
        return m.group(3) or ""

    return _VAR.sub(sub, value)


def load_compose() -> dict:
    raw = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves << merge keys and anchors
    return interpolate(raw)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = shlex.split(value)[0] if value else ""
    return args


def port_set(spec: str) -> set[int]:
    """'7700-7715' or '6379' or '6379/tcp' -> the ports."""
    spec = spec.split("/")[0]
    lo, _, hi = spec.partition("-")
    return set(range(int(lo), int(hi or lo) + 1))


def dockerfile_exposed() -> list[set[int]]:
    ranges = []
    for word, rest in dockerfile_instructions():
        if word == "EXPOSE":
            ranges += [port_set(p) for p in rest.split()]
    return ranges


def published_container_port(spec) -> int:
    """Short syntax '[host:]hostport:containerport[/proto]' or the long syntax's target."""
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def _strip_heredocs(script: str) -> list[str]:
    lines, end = [], None
    for line in script.splitlines():
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            end = m.group(1)
            line = line[: m.start()]
        lines.append(line)
    return lines


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a small sh script (heredoc bodies skipped), as argv lists."""
    commands = []
    for line in _strip_heredocs(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in list(lexer) + [";"]:
            if token and set(token) <= set(";&|"):
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
    cleaned = []
    for argv in commands:
        while argv and (argv[0] in ("exec", "env", "then", "do", "else") or re.match(r"^\w+=", argv[0])):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def image_entrypoint() -> list[str]:
    for word, rest in reversed(dockerfile_instructions()):
        if word == "ENTRYPOINT":
            return json.loads(rest)
    return []


def service_commands(service: dict) -> list[list[str]]:
    """Every command line a service runs: entrypoint + command, shell scripts split up."""
    entrypoint = service.get("entrypoint", image_entrypoint())
    command = service.get("command", [])
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    argv = entrypoint + command
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        return shell_commands(argv[2])
    return [argv] if argv else []


def healthcheck_commands(service: dict) -> list[list[str]]:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return []
    if isinstance(test, str):
        return shell_commands(test)
    if test[0] == "CMD":
        return [list(test[1:])]
    if test[0] == "CMD-SHELL":
        return shell_commands(test[1])
    return []


def memstore_argv(argv: list[str]) -> list[str] | None:
    """argv after the program if it runs the memstore CLI, else None."""
    if argv and Path(argv[0]).name == "memstore":
        return argv[1:]
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "memstore.cli.main"]:
        return argv[3:]
    return None


def subcommand(args: list[str]) -> str:
    positional = [a for a in args if not a.startswith("-")]
    assert positional, f"memstore run without a subcommand: {args}"
    return positional[0]


def all_memstore_runs(compose: dict) -> list[tuple[str, list[str]]]:
    """(service, args after `memstore`) for every memstore invocation, healthchecks included."""
    runs = []
    for name, service in compose["services"].items():
        for argv in service_commands(service) + healthcheck_commands(service):
            args = memstore_argv(argv)
            if args is not None:
                runs.append((name, args))
    return runs


def flag(args: list[str], name: str) -> str | None:
    """The value of --name in args, as `--name value` or `--name=value`."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def runs_ray_start(service: dict) -> bool:
    return any(argv[:2] == ["ray", "start"] for argv in service_commands(service))


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def size_bytes(text) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert m, f"bad size {text!r}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (v or {}).get("condition", "service_started") for d, v in deps.items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def head_flags(services) -> dict[str, str]:
    argv = service_commands(services["ray-head"])[0]
    assert argv[:3] == ["ray", "start", "--head"], argv
    return {"port": flag(argv, "--port") or "6379",
            "client": flag(argv, "--ray-client-server-port") or "10001",
            "dashboard": flag(argv, "--dashboard-port") or "8265"}


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_loads_with_the_expected_services(compose):
    assert "version" not in compose  # obsolete in the compose spec
    assert set(compose["services"]) == SERVICES


def test_every_service_builds_from_the_repo_dockerfile(services):
    assert DOCKERFILE.is_file()
    builds = []
    for name, service in services.items():
        build = service.get("build")
        assert build, f"{name} does not build the image"
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        assert context == ROOT, f"{name} builds from {context}"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        builds.append(build)
    assert all(b == builds[0] for b in builds), "services should share one build block"
    assert len({s.get("image") for s in services.values()}) == 1, "one image tag for every service"


def test_memstore_subcommands_are_real_or_planned(compose):
    runs = all_memstore_runs(compose)
    used = {subcommand(args) for _, args in runs}
    assert {"up", "health", "train"} <= used, used
    known = set(cli.SUBCOMMANDS) | PLANNED
    for service, args in runs:
        assert subcommand(args) in known, f"{service} runs `memstore {' '.join(args)}`: no such subcommand"


def _compose_memstore_args(sub: str) -> list[tuple[str, list[str]]]:
    return [(s, a) for s, a in all_memstore_runs(load_compose()) if subcommand(a) == sub]


# The least each planned subcommand must accept (the README's multi-node steps use these).
MINIMAL_ARGS = {"up": ["--name", "engram", "--shards", "4"], "down": ["engram"], "ls": [],
                "health": ["engram"], "train": []}


@pytest.mark.parametrize("sub", sorted(PLANNED))
def test_planned_subcommand_exists_and_accepts_the_compose_flags(sub):
    if sub not in cli.SUBCOMMANDS:
        pytest.skip(f"`memstore {sub}` is planned but not in memstore.cli.main.SUBCOMMANDS yet")
    parser = cli.build_parser()
    runs = _compose_memstore_args(sub) or [("README", [sub, *MINIMAL_ARGS[sub]])]
    for service, args in runs:
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{service}: `memstore {' '.join(args)}` is rejected by the CLI's parser")
        assert parsed.command == sub


def test_existing_subcommands_accept_the_compose_flags(compose):
    parser = cli.build_parser()
    for service, args in all_memstore_runs(compose):
        if subcommand(args) in cli.SUBCOMMANDS:
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{service}: `memstore {' '.join(args)}` is rejected by the CLI's parser")


def test_head_publishes_the_ray_ports_it_listens_on(services):
    ports = head_flags(services)
    published = {published_container_port(p) for p in services["ray-head"].get("ports", [])}
    assert published == {int(ports["port"]), int(ports["client"]), int(ports["dashboard"])}
    for spec in services["ray-head"]["ports"]:  # Ray's ports carry no authentication
        assert str(spec).startswith("127.0.0.1:"), f"{spec} is published beyond loopback by default"


def test_ports_match_dockerfile_expose_and_port_bases(services):
    exposed = dockerfile_exposed()
    exposed_ports = set().union(*exposed)
    ports = head_flags(services)
    assert {int(ports["port"]), int(ports["client"]), int(ports["dashboard"])} <= exposed_ports

    env_df = dockerfile_env()
    for name in MEMORY_NODES:
        service = services[name]
        declared = [port_set(str(p)) for p in service.get("expose", [])]
        assert declared, f"{name} declares no shard ports"
        for ports_ in declared:
            assert ports_ in exposed, f"{name} exposes {min(ports_)}-{max(ports_)}, the Dockerfile does not"
        for var in ("MEMSTORE_PORT_BASE", "MEMSTORE_METRICS_PORT_BASE"):
            base = int(service["environment"][var])
            assert base == int(env_df[var]), f"{var}: compose {base}, Dockerfile {env_df[var]}"
            [port_range] = [r for r in declared if min(r) == base] or [None]
            assert port_range, f"{name}: {var}={base} starts no declared port range"
            assert not port_range & set(RAY_WORKER_PORTS), f"{var} range overlaps Ray's worker ports"
            assert not port_range & {int(v) for v in ports.values()}
    grpc = port_set(next(p for p in services["memory-1"]["expose"] if str(p).startswith(str(env_df["MEMSTORE_PORT_BASE"]))))
    metrics = port_set(next(p for p in services["memory-1"]["expose"] if str(p).startswith(str(env_df["MEMSTORE_METRICS_PORT_BASE"]))))
    assert not grpc & metrics


def test_referenced_services_and_ray_addresses_exist(services):
    ports = head_flags(services)
    for name, service in services.items():
        for dep in depends_on(service):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for argv in service_commands(service) + healthcheck_commands(service):
            address = flag(argv, "--address")
            if address is None:
                continue
            client = address.startswith("ray://")
            host, _, port = address.removeprefix("ray://").rpartition(":")
            assert host in services, f"{name}: --address {address} names no service"
            assert host == "ray-head"
            assert port == (ports["client"] if client else ports["port"]), f"{name}: {address} is not the head's port"
            # A Ray driver given a GCS address attaches to the raylet of its own machine: only
            # Ray nodes may use one. `ray start` and `ray health-check` talk to the GCS alone.
            if not client and memstore_argv(argv) is not None:
                assert runs_ray_start(service), f"{name} is no Ray node: connect through ray://ray-head:{ports['client']}"


def test_memory_nodes_offer_the_memstore_resource_and_the_head_none(services):
    for name in MEMORY_NODES:
        argv = service_commands(services[name])[0]
        assert argv[:2] == ["ray", "start"] and "--block" in argv
        assert json.loads(flag(argv, "--resources")) == {"memstore": 1}
    head = service_commands(services["ray-head"])[0]
    assert "--block" in head
    assert json.loads(flag(head, "--resources") or "{}").get("memstore", 0) == 0


def test_memstore_up_and_trainer_order(services):
    up = services["memstore-up"]
    assert str(up.get("restart")) == "no"
    deps = depends_on(up)
    assert {"ray-head", *MEMORY_NODES} <= set(deps)
    assert depends_on(services["trainer"]) == {"memstore-up": "service_completed_successfully"}
    [(_, up_args)] = _compose_memstore_args("up")
    [(_, train_args)] = _compose_memstore_args("train")
    assert flag(up_args, "--name") == flag(train_args, "--store") == "engram"
    assert int(flag(up_args, "--shards")) == 4


def test_no_healthcheck_waits_on_the_store_it_precedes(services):
    """A service that others wait on with service_healthy must not be healthy only once the
    store exists: memstore-up would wait forever for it."""
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            if condition != "service_healthy":
                continue
            for argv in healthcheck_commands(services[dep]):
                args = memstore_argv(argv)
                assert args is None or subcommand(args) != "health", f"{name} waits on {dep}'s store health"


def test_healthchecks(services):
    [(_, up_args)] = _compose_memstore_args("up")
    store = flag(up_args, "--name")
    for name in ("ray-head", *MEMORY_NODES):
        check = services[name]["healthcheck"]
        interval, timeout = duration_s(check["interval"]), duration_s(check["timeout"])
        assert 5 <= interval <= 120 and 0 < timeout <= interval
        assert 1 <= int(check["retries"]) <= 20
        assert duration_s(check.get("start_period", "0s")) >= 10
    for name in MEMORY_NODES:
        [argv] = healthcheck_commands(services[name])
        args = memstore_argv(argv)
        assert args is not None and subcommand(args) == "health", argv
        assert [a for a in args if not a.startswith("-")][1] == store
        assert flag(args, "--address") == f"ray-head:{head_flags(services)['port']}"


def test_shm_and_object_store(services):
    for name, service in services.items():
        shm = size_bytes(service.get("shm_size", "64m"))
        assert shm >= 1 << 30, f"{name}: shm_size {shm} is too small for Ray"
        for argv in service_commands(service):
            if argv[:2] == ["ray", "start"]:
                store = flag(argv, "--object-store-memory")
                assert store and int(store) < shm, f"{name}: the object store must fit in /dev/shm"


def test_data_volume_where_shards_coordinator_and_trainer_write(compose, services):
    """Shards write their logs and checkpoint files under MEMSTORE_DATA_DIR, the coordinator
    (on any node, the head included) stages checkpoints there, the trainer writes runs/ there:
    all of them must see one shared volume at that path."""
    data_dir = services["memory-1"]["environment"]["MEMSTORE_DATA_DIR"]
    assert data_dir == dockerfile_env()["MEMSTORE_DATA_DIR"] == "/var/lib/memstore"
    holders = set()
    for name, service in services.items():
        assert service["environment"]["MEMSTORE_DATA_DIR"] == data_dir, name
        for volume in service.get("volumes", []):
            source, _, target = str(volume).partition(":")
            if target.split(":")[0] == data_dir:
                assert source in compose.get("volumes", {}), f"{name} mounts {source}, not a named volume"
                holders.add(name)
    assert holders == {"ray-head", *MEMORY_NODES, "trainer"}
    assert services["trainer"].get("working_dir") == data_dir  # `memstore train` writes runs/<timestamp>/
    text = DOCKERFILE.read_text()
    assert f"mkdir -p {data_dir}" in text and f"chown memstore:memstore {data_dir}" in text


def test_store_config_is_mounted_and_parses_into_table_specs(services):
    [(service, up_args)] = _compose_memstore_args("up")
    target = flag(up_args, "--config")
    [volume] = [v for v in services[service]["volumes"] if str(v).split(":")[1] == target]
    source, _, rest = str(volume).partition(":")
    assert rest.endswith(":ro"), f"{volume} should be read-only"
    path = (ROOT / source).resolve()
    assert path.is_file() and path.is_relative_to(ROOT), path
    doc = tomllib.loads(path.read_text())
    assert set(doc) == {"tables"}
    specs = [TableSpec.from_dict(t) for t in doc["tables"]]
    assert specs and len({s.name for s in specs}) == len(specs)


def test_example_config_is_the_engram_config_in_its_header():
    """cluster/store.example.toml lists the tables trainer.engram builds for the EngramConfig
    named in its header (prime sizes, head dim, per-table seeds, Adam)."""
    hashing = pytest.importorskip("trainer.hashing")
    engram = pytest.importorskip("trainer.engram")
    cfg = engram.EngramConfig(engram_vocab_size=[20480, 20480], max_ngram_size=3, n_embed_per_ngram=128,
                              n_head_per_ngram=2, layer_ids=[1], seed=0)
    expected, seen, head = {}, set(), 0
    for layer in cfg.layer_ids:
        for n in range(2, cfg.max_ngram_size + 1):
            start = cfg.engram_vocab_size[n - 2] - 1
            for _ in range(cfg.n_head_per_ngram):
                start = hashing.find_next_prime(start, seen)
                seen.add(start)
                expected[engram.table_name(cfg, layer, head)] = (start, cfg.head_dim, engram.table_seed(cfg, layer, head))
                head += 1
    doc = tomllib.loads((ROOT / "cluster" / "store.example.toml").read_text())
    specs = [TableSpec.from_dict(t) for t in doc["tables"]]
    assert {s.name: (s.num_rows, s.dim, s.seed) for s in specs} == expected
    assert all(s.optimizer == cfg.table_optimizer for s in specs)


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_defaults_to_cpu_torch(compose):
    args = dockerfile_args()
    spec = args["TORCH_SPEC"]
    assert re.search(r"torch==\d+\.\d+\.\d+", spec) and "download.pytorch.org/whl/cpu" in spec
    # Same torch as .ci/setup installs by default.
    setup_pin = re.search(r"TORCH_SPEC:-(torch==[\d.]+)", (ROOT / ".ci" / "setup").read_text())
    if setup_pin:
        assert spec.split()[0] == setup_pin.group(1)
    # The compose build arg defaults to the same value, and a CUDA value is documented.
    assert compose["x-build"]["args"]["TORCH_SPEC"] == spec
    assert re.search(r"TORCH_SPEC=\"torch==[\d.]+ --index-url https://download.pytorch.org/whl/cu\d+\"",
                     DOCKERFILE.read_text())


def test_dockerfile_layout():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copies = [rest for w, rest in instructions if w == "COPY"]
    assert copies[0] == "pyproject.toml ./" and copies[1] == ". ."  # dependencies cached apart from sources
    runs = [rest for w, rest in instructions if w == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "pip install ${TORCH_SPEC}" in r)
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install \.( |$)", r))
    assert torch_run < project_run
    user = [rest for w, rest in instructions if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["memstore"]
    assert words.index("USER") > words.index("RUN")


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for must in (".venv", ".git", "runs", "**/__pycache__", ".pytest_cache"):
        assert must in patterns, f".dockerignore does not exclude {must}"

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for needed in ("pyproject.toml", "README.md", "memstore", "trainer", "cluster", "protos",
                   "cluster/store.example.toml"):
        assert (ROOT / needed).exists() and not ignored(needed), f"the image needs {needed}"


# ---------------------------------------------------------------------------------------------
# The real compose parser, where installed


def _compose_cli() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def test_docker_compose_config_validates():
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no Docker Compose (neither the `docker compose` plugin nor docker-compose) on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "MEMSTORE_IMAGE")}
    r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
