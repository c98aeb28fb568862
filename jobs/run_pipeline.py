"""The whole SLSR pipeline as a Ray job.

    ray job submit --working-dir . -- python jobs/run_pipeline.py \
        --config market1501 --run-root s3://bucket/slsr/market --set data.root=/data/Market-1501-v15.09.15
"""

import sys

from slsr_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job())
