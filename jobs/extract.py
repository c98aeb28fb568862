"""Features of the training images with the pretrained model (prepare -> pretrain -> extract) as a Ray job.

    ray job submit --working-dir . -- python jobs/extract.py --config market1501 --run-root s3://bucket/run
"""

import sys

from slsr_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(until="extract", description="Run the pipeline up to feature extraction."))
