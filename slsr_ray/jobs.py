"""Shared argument handling of the ``jobs/*.py`` entry points (``ray job submit -- python jobs/x.py``).

Inside a Ray job ``RAY_ADDRESS`` is set, so ``init_ray()`` joins the cluster the job was submitted to;
all inputs come from the run root / S3, never from the submitting machine's disk.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .errors import is_user_error, report_error


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="synthetic", help="preset name or YAML path / s3:// URI")
    p.add_argument("--run-root", required=True, help="run root: s3://bucket/prefix on a cluster")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the traceback of an error, and Ray's own logs and the workers' output")
    return p


def run_entry(body: Callable[[], None], verbose: bool) -> int:
    """Run a job's body with the project's one error path: a user error (any ``SlsrError``, also when
    Ray re-raises it from a worker) is one line ``error: ...`` on stderr and exit status 2 (traceback
    with ``--verbose``); anything else is a bug and keeps its traceback. The console is quiet unless
    ``verbose`` (:mod:`slsr_ray.console`)."""
    from .console import configure

    configure(verbose=verbose)
    try:
        body()
    except Exception as e:
        if not is_user_error(e):
            raise
        return report_error(e, verbose=verbose)
    return 0


def run_job(stages_from: str | None = None, until: str | None = None, argv: list[str] | None = None,
            description: str = "Run the SLSR pipeline on the connected Ray cluster.") -> int:
    """Parse job arguments, check everything, join Ray and run the pipeline (or the part of it
    between two stages; once per split with evaluate.trials > 1)."""
    p = job_parser(description)
    p.add_argument("--from", dest="from_stage", default=stages_from, help="rerun from this stage")
    p.add_argument("--until", default=until, help="stop after this stage")
    args = p.parse_args(argv)

    def body() -> None:
        from .pipeline import load_config
        from .raysetup import init_ray
        from .trials import check_trials, run_protocol
        from .validate import validate_config

        cfg = load_config(args.config, args.overrides, args.run_root)
        validate_config(cfg, check_inputs=True, from_stage=args.from_stage, until=args.until)  # before Ray
        check_trials(cfg)
        init_ray(run_root=cfg.run_root)
        run_protocol(cfg, from_stage=args.from_stage, until=args.until)

    return run_entry(body, args.verbose)
