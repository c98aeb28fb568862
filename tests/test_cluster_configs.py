"""Cluster configs parse and carry the fields the tools accept."""

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "cluster_configs"

# Field names of the KubeRay v1 CRDs (ray-operator/apis/ray/v1): Ray ships no schema, so the
# accepted keys are listed here and anything else (a typo) fails the test.
RAYJOB_SPEC_KEYS = {
    "entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "jobId", "metadata", "clusterSelector", "submitterPodTemplate", "submissionMode", "suspend",
    "activeDeadlineSeconds", "backoffLimit", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources",
    "managedBy", "deletionStrategy",
}
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
}
HEAD_GROUP_KEYS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
    "numOfHosts", "idleTimeoutSeconds", "suspend",
}


def _check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, set(spec) - RAYCLUSTER_SPEC_KEYS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_KEYS
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, set(group) - WORKER_GROUP_KEYS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            gpus += int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert c["resources"]["limits"] == c["resources"]["requests"]  # Ray needs requests == limits
    assert gpus > 0, "no GPU worker group"


def test_aws_launcher_config_validates_with_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(cfg))
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g5", "p4d")) for v in workers.values())
    assert all("IamInstanceProfile" in v["node_config"] for v in cfg["available_node_types"].values())
    # the project comes in the image (Dockerfile at the repo root), not from setup commands
    assert "slsr-ray" in cfg["docker"]["worker_image"] and cfg["setup_commands"] == []


def test_local_launcher_config_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((CONFIGS / "local.yaml").read_text())))


def test_launcher_schema_rejects_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(cfg))


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    assert "jobs/run_pipeline.py" in spec["entrypoint"] and "s3://" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])
