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
