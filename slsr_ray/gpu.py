"""GPUs on a Ray cluster: how many each stage asks for, so that the work fits on the nodes that have
them (never waiting in PENDING for a GPU no node can give), and what a process does when Ray gave it a
GPU but CUDA is not there (a node that advertises ``--num-gpus`` without a usable CUDA): it runs on CPU
tensors and says so once.

Every decision reads the cluster's *alive nodes* (``ray.nodes()``), not only the totals of
``ray.cluster_resources()``: two nodes with one GPU each hold two whole-GPU actors, not three actors
of 2/3 GPU each.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)

CPU_FALLBACK_TAG = "[slsr] no CUDA"  # start of the one log line a GPU process without CUDA writes
_EPS = 1e-6
_warned: set[str] = set()


class GpuRequestError(ValueError):
    """A stage asked for more GPUs than the Ray cluster has (the work could never be scheduled)."""


@dataclass(frozen=True)
class GpuNode:
    node_id: str
    gpus: float
    cpus: float


def gpu_nodes() -> list[GpuNode]:
    """The alive nodes that advertise GPUs, most GPUs first."""
    import ray

    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("GPU", 0) > 0:
            nodes.append(GpuNode(n["NodeID"], float(res["GPU"]), float(res.get("CPU", 0))))
    return sorted(nodes, key=lambda n: -n.gpus)


def cluster_gpus() -> float:
    return sum(n.gpus for n in gpu_nodes())


def slots(gpus_each: float, nodes: list[GpuNode] | None = None) -> int:
    """How many tasks of ``gpus_each`` GPUs the GPU nodes hold at once."""
    nodes = gpu_nodes() if nodes is None else nodes
    return sum(math.floor(n.gpus / gpus_each + _EPS) for n in nodes) if gpus_each > 0 else 0


def share(count: int, nodes: list[GpuNode] | None = None) -> float:
    """The GPU fraction per actor (at most 1) with which ``count`` actors fit on the GPU nodes at once:
    1 with enough whole GPUs, else 1/m for the smallest m that fits (m actors share a GPU); 0 without
    GPUs."""
    nodes = gpu_nodes() if nodes is None else nodes
    if not nodes or count < 1:
        return 0.0
    m = 1
    while slots(1.0 / m, nodes) < count:
        m += 1
    return 1.0 / m


def cpus_beside(count: int, gpus_each: float, cpus_wanted: float, nodes: list[GpuNode] | None = None) -> float:
    """CPUs per GPU actor, at most ``cpus_wanted``, such that however Ray places the ``count`` actors on
    the GPU nodes, each node has the CPUs for the actors its GPUs can hold (two decimals, rounded down)."""
    nodes = gpu_nodes() if nodes is None else nodes
    caps = [n.cpus / held for n in nodes if (held := min(count, math.floor(n.gpus / gpus_each + _EPS))) > 0]
    return math.floor(min([cpus_wanted, *caps]) * 100) / 100


def check_request(gpus_each: float, count: int, what: str, together: bool = False,
                  nodes: list[GpuNode] | None = None) -> None:
    """Raise :class:`GpuRequestError` when ``count`` x ``gpus_each`` GPUs can never be scheduled: no GPUs,
    no node with ``gpus_each`` of them, or (``together``: gang-scheduled, e.g. DDP workers) fewer
    places than ``count``."""
    if gpus_each <= 0:
        return
    nodes = gpu_nodes() if nodes is None else nodes
    total = sum(n.gpus for n in nodes)
    if not nodes:
        raise GpuRequestError(f"{what} asks for {gpus_each:g} GPU(s) each but the Ray cluster has no GPUs "
                              "(it would wait forever); leave the GPU setting unset to run on CPUs")
    if gpus_each > nodes[0].gpus + _EPS:
        raise GpuRequestError(f"{what} asks for {gpus_each:g} GPUs each but the largest node has "
                              f"{nodes[0].gpus:g} (cluster: {total:g} GPUs on {len(nodes)} node(s))")
    if together and slots(gpus_each, nodes) < count:
        raise GpuRequestError(f"{what} asks for {count} x {gpus_each:g} GPUs at once but the Ray cluster has "
                              f"{total:g} GPUs on {len(nodes)} node(s)")


def gpu_assigned() -> bool:
    """In a Ray task/actor: whether Ray gave it a GPU; elsewhere (a driver, a plain script): whether
    CUDA is available."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return bool(ray.get_gpu_ids())
    import torch

    return torch.cuda.is_available()


def device_for(assigned: bool, what: str):
    """The torch device of a process Ray gave ``assigned`` GPUs: cuda when CUDA works here, else cpu,
    with one warning line per process and ``what`` when a GPU was assigned but CUDA is absent."""
    import torch

    if not assigned:
        return torch.device("cpu")
    if torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned; an indexed device because some torch
        # calls (torch.cuda.set_device, in Ray Train's prepare_model) refuse a bare "cuda"
        return torch.device("cuda", torch.cuda.current_device())
    warn_no_cuda(what)
    return torch.device("cpu")


def warn_no_cuda(what: str, reason: str | None = None) -> None:
    """Log, once per process and ``what``, that a GPU was assigned but cannot be used (by default:
    CUDA is missing), so the work runs on CPU."""
    import torch

    if what in _warned:
        return
    _warned.add(what)
    reason = reason or f"CUDA is not available here (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    log.warning("%s: %s on %s (pid %d) was given GPU(s) %s by Ray but %s; running on CPU", CPU_FALLBACK_TAG,
                what, socket.gethostname(), os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "?"), reason)


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


_cuda_by_node: dict[str, bool] = {}


def nodes_without_cuda(timeout_s: float = 120.0) -> list[str]:
    """The GPU nodes whose GPUs torch cannot use (probed once per node and driver process by a tiny task
    on each; a node whose probe does not answer in ``timeout_s`` counts as having CUDA)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_cuda_here)
    refs = {}
    for n in gpu_nodes():
        if n.node_id not in _cuda_by_node:
            strategy = NodeAffinitySchedulingStrategy(n.node_id, soft=False)
            refs[n.node_id] = probe.options(num_cpus=0, num_gpus=min(0.01, n.gpus), scheduling_strategy=strategy).remote()
    for node_id, ref in refs.items():
        try:
            _cuda_by_node[node_id] = bool(ray.get(ref, timeout=timeout_s))
        except ray.exceptions.GetTimeoutError:
            log.warning("the CUDA probe of GPU node %s did not answer in %.0f s; assuming CUDA works there",
                        node_id, timeout_s)
            _cuda_by_node[node_id] = True
    return [n.node_id for n in gpu_nodes() if not _cuda_by_node.get(n.node_id, True)]


def ddp_backend() -> str:
    """The torch.distributed backend of GPU train workers: NCCL, or gloo when some GPU node has no
    usable CUDA (its workers then train on CPU tensors, which NCCL cannot reduce) or torch has no NCCL."""
    import torch.distributed as dist

    missing = nodes_without_cuda()
    if missing:
        log.warning("%s: GPU node(s) %s have no usable CUDA: DDP over gloo on CPU tensors there",
                    CPU_FALLBACK_TAG, ", ".join(m[:12] for m in missing))
        return "gloo"
    return "nccl" if dist.is_available() and dist.is_nccl_available() else "gloo"
