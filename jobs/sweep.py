"""A Ray Tune sweep over K, lambda and the generated count as a Ray job.

    ray job submit --working-dir . -- python jobs/sweep.py --config market1501 \
        --run-root s3://bucket/slsr/market --k 2 3 4 5 --lambda 1.0 --generated 0 4000 8000 12000 \
        --set data.manifests=s3://bucket/manifests/market

Rerun with ``--resume`` to continue an interrupted sweep (``Tuner.restore`` on the run root's experiment).
"""

import sys

from slsr_ray.jobs import job_parser, run_entry


def main(argv=None) -> int:
    p = job_parser("Ray Tune sweep over K, lambda and the number of generated images.")
    p.add_argument("--k", dest="ks", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--lambda", dest="lams", type=float, nargs="+", default=[1.0])
    p.add_argument("--generated", type=int, nargs="+", default=[0, 4000, 8000, 12000])
    p.add_argument("--lr", dest="lrs", type=float, nargs="+", default=None)
    p.add_argument("--search", default="grid", choices=["grid", "random", "optuna"])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--asha", action="store_true")
    p.add_argument("--concurrent", type=int, default=1)
    p.add_argument("--trial-cpus", type=float, default=1.0)
    p.add_argument("--train-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--no-retrain-best", dest="retrain_best", action="store_false")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    def body() -> None:
        from slsr_ray.errors import as_config_error
        from slsr_ray.pipeline import load_config
        from slsr_ray.raysetup import init_ray
        from slsr_ray.tune import SweepConfig, run_sweep
        from slsr_ray.validate import validate_config

        cfg = load_config(args.config, args.overrides, args.run_root)
        with as_config_error("sweep options"):
            sweep = SweepConfig(
                ks=args.ks, lams=args.lams, generated=args.generated, lrs=args.lrs, search=args.search,
                num_samples=args.samples, asha=args.asha, max_concurrent_trials=args.concurrent,
                trial_cpus=args.trial_cpus, train_workers=args.train_workers, cpus_per_worker=args.cpus_per_worker,
                val_fraction=args.val_fraction, retrain_best=args.retrain_best,
            )
        validate_config(cfg, check_inputs=True)  # before Ray starts
        init_ray(run_root=cfg.run_root)
        run_sweep(cfg, sweep, resume=args.resume)

    return run_entry(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
