"""GPU requests that fit the cluster's nodes (pure decisions on node lists), and the CPU fallback of a
process that Ray gave a GPU on a node without CUDA (this machine has none)."""

from __future__ import annotations

import logging

import pytest
import torch

from slsr_ray import gpu
from slsr_ray.gpu import GpuNode, GpuRequestError

ONE_GPU_NODES = [GpuNode("a", 1, 1), GpuNode("b", 1, 1)]


def test_shares_fit_each_node_not_only_the_total():
    # 3 actors on two 1-GPU nodes: 1/2 each (2/3 of the total would leave the third pending forever)
    assert gpu.share(3, ONE_GPU_NODES) == 0.5
    assert gpu.slots(2 / 3, ONE_GPU_NODES) == 2 < 3 <= gpu.slots(0.5, ONE_GPU_NODES)
    assert gpu.share(2, ONE_GPU_NODES) == 1.0
    assert gpu.share(5, [GpuNode("x", 4, 8)]) == 0.5
    assert gpu.share(3, [GpuNode("x", 1, 8)]) == pytest.approx(1 / 3)
    assert gpu.share(3, []) == 0.0


def test_cpus_beside_the_gpus_fit_the_smallest_gpu_node():
    # a 1-CPU GPU node holding two half-GPU actors can give each at most half a CPU
    assert gpu.cpus_beside(3, 0.5, 1.0, ONE_GPU_NODES) == 0.5
    assert gpu.cpus_beside(2, 1.0, 1.0, ONE_GPU_NODES) == 1.0
    assert gpu.cpus_beside(2, 1.0, 4.0, [GpuNode("big", 1, 16), GpuNode("small", 1, 2)]) == 2.0


def test_impossible_requests_are_clear_errors():
    with pytest.raises(GpuRequestError, match="asks for 2 GPUs each but the largest node has 1"):
        gpu.check_request(2, 1, "extraction", nodes=ONE_GPU_NODES)
    with pytest.raises(GpuRequestError, match="asks for 3 x 1 GPUs at once but the Ray cluster has 2 GPUs"):
        gpu.check_request(1, 3, "train", together=True, nodes=ONE_GPU_NODES)
    with pytest.raises(GpuRequestError, match="has no GPUs"):
        gpu.check_request(0.5, 1, "gan", nodes=[])
    gpu.check_request(1, 2, "train", together=True, nodes=ONE_GPU_NODES)  # fits
    gpu.check_request(0, 9, "cpu only", nodes=[])  # asks for no GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_process_without_cuda_runs_on_cpu_and_says_so_once(caplog):
    caplog.set_level(logging.WARNING, logger="slsr_ray.gpu")
    assert gpu.device_for(True, "test worker") == torch.device("cpu")
    assert gpu.device_for(True, "test worker") == torch.device("cpu")
    assert gpu.device_for(False, "cpu worker") == torch.device("cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(gpu.CPU_FALLBACK_TAG) and "test worker" in lines[0]


def test_a_gpu_process_with_cuda_gets_an_indexed_device(monkeypatch):
    # torch.cuda.set_device (Ray Train's prepare_model) refuses a bare "cuda": the GPU smoke run on an
    # H100 failed on that, so the device must carry its index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = gpu.device_for(True, "gpu worker")
    assert device == torch.device("cuda", 0) and device.index == 0
    assert gpu.device_for(False, "cpu worker") == torch.device("cpu")


@pytest.fixture
def two_one_gpu_nodes(monkeypatch):
    """What the stages see of a cluster: two nodes with one GPU and one CPU each (4 CPUs in all)."""
    import ray

    monkeypatch.setattr(gpu, "gpu_nodes", lambda: list(ONE_GPU_NODES))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})


def test_stages_size_their_gpu_requests_to_the_nodes(two_one_gpu_nodes):
    from slsr_ray.extract import ExtractConfig, ExtractError, _resources
    from slsr_ray.gan import GanConfig, GanError, actor_resources
    from slsr_ray.train import TrainConfig, _gpu_workers

    # GAN: 3 actors at 1/2 GPU (not 2/3) with half of a GPU node's CPU each; 2 actors at a whole GPU
    assert actor_resources(GanConfig(), 3) == (0.5, 0.5)
    assert actor_resources(GanConfig(), 2) == (1.0, 1.0)
    with pytest.raises(GanError, match="asks for 2 GPUs each but the largest node has 1"):
        actor_resources(GanConfig(num_gpus=2), 2)
    # Train: one whole GPU per worker; 3 workers on 2 GPUs run as 2 (same global batch) unless forced
    assert _gpu_workers(TrainConfig(num_workers=2)) == (True, 2, 1.0)
    assert _gpu_workers(TrainConfig(num_workers=3, batch_size=12)) == (True, 2, 1.0)
    with pytest.raises(GpuRequestError, match="3 x 1 GPUs at once but the Ray cluster has 2 GPUs"):
        _gpu_workers(TrainConfig(num_workers=3, batch_size=12, use_gpu=True))
    assert _gpu_workers(TrainConfig(num_workers=3, batch_size=12, use_gpu=False)) == (False, 3, 1.0)
    # extraction: an actor per GPU, no more CPUs than a GPU node has, decode tasks on the free CPUs
    assert _resources(ExtractConfig(cpus_per_actor=2.0)) == (2, 1.0, "tasks", 1.0)
    with pytest.raises(ExtractError, match="3 actors x 1 GPUs exceed the cluster's GPUs"):
        _resources(ExtractConfig(num_actors=3))
