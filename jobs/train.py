"""The final training and evaluation stages as a Ray job (earlier stages are reused from the run root,
or run first if missing).

    ray job submit --working-dir . -- python jobs/train.py --config market1501 --run-root s3://bucket/run \
        --set train.lam=0.5 --set train.num_workers=4
"""

import sys

from slsr_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(description="Run the pipeline through training and evaluation."))
