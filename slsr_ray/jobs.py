"""Shared argument handling of the ``jobs/*.py`` entry points (``ray job submit -- python jobs/x.py``).

Inside a Ray job ``RAY_ADDRESS`` is set, so ``init_ray()`` joins the cluster the job was submitted to;
all inputs come from the run root / S3, never from the submitting machine's disk.
"""

from __future__ import annotations

import argparse
import sys


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="synthetic", help="preset name or YAML path / s3:// URI")
    p.add_argument("--run-root", required=True, help="run root: s3://bucket/prefix on a cluster")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.epochs=5 (repeatable)")
    return p


def run_job(stages_from: str | None = None, until: str | None = None, argv: list[str] | None = None,
            description: str = "Run the SLSR pipeline on the connected Ray cluster.") -> int:
    """Parse job arguments, join Ray and run the pipeline (or the part of it between two stages)."""
    from .config import ConfigError
    from .data import DatasetError
    from .pipeline import load_config
    from .raysetup import init_ray
    from .storage import StorageError
    from .trials import check_trials, run_protocol

    p = job_parser(description)
    p.add_argument("--from", dest="from_stage", default=stages_from, help="rerun from this stage")
    p.add_argument("--until", default=until, help="stop after this stage")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.run_root)
        check_trials(cfg)
        init_ray()
        run_protocol(cfg, from_stage=args.from_stage, until=args.until)
    except (ConfigError, DatasetError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
