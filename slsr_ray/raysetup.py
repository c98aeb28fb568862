"""Starting or joining Ray the same way from the CLI, jobs and notebooks."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("slsr_ray")


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS`` (inside ``ray job submit`` this is set), or
    start a local Ray sized to this machine. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    # A laptop run: no token auth prompt, a modest object store, no dashboard to keep startup fast.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("object_store_memory", 512 * 1024 * 1024)
    ray.init(**kwargs)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = True
    except Exception:  # pragma: no cover - progress bars are cosmetic
        pass
