"""Shipping files checked without a Docker engine: the Dockerfile is hadolint-clean, every path it copies
exists, serving/ (all the serving image gets) needs no dev-only package, its entry point and health check
parse with their own parsers, the serving image's requirements agree with pyproject.toml, and the Kubernetes
example is valid YAML the server accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from support import parse_only

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(text: str) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stage, out = "", []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        out.append((stage, word.upper(), rest))
    return out


INSTRUCTIONS = _instructions(DOCKERFILE)


def test_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists():
    for stage, word, rest in INSTRUCTIONS:
        if word != "COPY" or "--from=" in rest:
            continue
        sources = shlex.split(rest)[:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"stage {stage}: COPY {src} does not exist"


def test_serving_image_is_slim_and_non_root():
    serving = [(w, r) for s, w, r in INSTRUCTIONS if s == "serving"]
    copies = [r for w, r in serving if w == "COPY" and "--from=" not in r]
    assert copies == ["serving/ /app/serving/"], "the serving image must ship serving/ only"
    users = [r for w, r in serving if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = " ".join(r for w, r in serving if w == "EXPOSE").split()
    assert {"50051", "8000", "8002"} <= set(exposed)
    assert any(w == "HEALTHCHECK" for w, _ in serving)


def test_serving_package_holds_runtime_code_only():
    """What the serving image copies: the server and the client package, no dev tooling (scripts/) and nothing
    from training or export."""
    client = ROOT / "serving" / "client"
    assert (client / "__init__.py").is_file() and (client / "__main__.py").is_file()
    dev_only = re.compile(r"^\s*(?:from|import)\s+(grpc_tools|pytest|tritonclient|training|export|scripts|bench)\b",
                          re.MULTILINE)
    offenders = {str(path.relative_to(ROOT)): match.group(1) for path in (ROOT / "serving").rglob("*.py")
                 for match in [dev_only.search(path.read_text())] if match}
    assert offenders == {}, f"the serving image would ship code needing dev-only packages: {offenders}"


def _exec_form(rest: str) -> list[str]:
    return yaml.safe_load(rest[rest.index("["):])


def test_entrypoint_and_healthcheck_parse():
    serving = [(w, r) for s, w, r in INSTRUCTIONS if s == "serving"]
    entry = _exec_form(next(r for w, r in serving if w == "ENTRYPOINT"))
    assert entry[:3] == ["python", "-m", "serving"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0" and entry[entry.index("--port") + 1] == "50051"
    result = parse_only(entry[2:])
    assert result.returncode == 0, result.stderr
    check = _exec_form(next(r for w, r in serving if w == "HEALTHCHECK").split("CMD", 1)[1])
    assert check[:3] == ["python", "-m", "serving.client.probe"]
    assert (ROOT / "serving" / "client" / "probe.py").is_file()
    result = parse_only(check[2:])
    assert result.returncode == 0, result.stderr


def _requirements(lines) -> dict[str, str]:
    reqs = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            reqs.update(_requirements((ROOT / line[3:].strip()).read_text().splitlines()))
        elif line:
            word = re.match(r"[A-Za-z0-9_.\[\],-]+", line).group(0)
            name = word.split("[")[0].lower()
            reqs[name] = line[len(word):].replace(" ", "")
    return reqs


SERVING_REQUIREMENTS = ("requirements-serving.txt", "requirements-serving-cuda.txt",
                        "requirements-serving-torchscript.txt")


@pytest.mark.parametrize("path", SERVING_REQUIREMENTS)
def test_serving_requirements_agree_with_pyproject(path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _requirements(project["dependencies"])
    serving = _requirements((ROOT / path).read_text().splitlines())
    assert pinned["torch"] == "==2.14.1" and pinned["torchvision"] == "==0.29.1"
    for name, spec in serving.items():
        assert name in pinned, f"{name} is in {path} but not in pyproject.toml"
        assert spec == pinned[name], f"{name}: {spec} ({path}) vs {pinned[name]} (pyproject)"


def test_the_default_serving_image_has_no_torch():
    """ONNX serving needs no PyTorch (gigabytes with its CUDA wheels); only the TorchScript flavour adds it."""
    assert "torch" not in _requirements((ROOT / "requirements-serving.txt").read_text().splitlines())
    assert "torch" in _requirements((ROOT / "requirements-serving-torchscript.txt").read_text().splitlines())
    deps = [r for s, w, r in INSTRUCTIONS if s == "serving-deps"]
    assert "REQUIREMENTS=requirements-serving.txt" in deps, "the serving image's default must be the ONNX-only set"
    assert all((ROOT / name).is_file() for name in SERVING_REQUIREMENTS)


def test_kubernetes_example():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051 and ports["http"] == 8000
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v2/health/ready" and probe["port"] == "http"
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    entry = _exec_form(next(r for s, w, r in INSTRUCTIONS if s == "serving" and w == "ENTRYPOINT"))
    result = parse_only(entry[2:] + container["args"])
    assert result.returncode == 0, result.stderr
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("pattern", [".venv/", "data/", "runs/", "model_repository/", "*.pt", "*.onnx", "*.npy"])
def test_gitignore_keeps_artefacts_out(pattern):
    assert pattern in (ROOT / ".gitignore").read_text().splitlines()


def test_kserve_inference_service():
    """A custom predictor: HTTP on the container's first port (8080), readiness over KServe v2 REST, flags the
    server accepts."""
    (service,) = list(yaml.safe_load_all((ROOT / "deploy" / "kserve.yaml").read_text()))
    assert service["apiVersion"] == "serving.grpc.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    (container,) = service["spec"]["predictor"]["containers"]
    assert container["command"] == ["python", "-m", "serving"]
    args = container["args"]
    port = container["ports"][0]["containerPort"]
    assert args[args.index("--http-port") + 1] == str(port) == "8080"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    result = parse_only(container["command"][2:] + args)
    assert result.returncode == 0, result.stderr


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
