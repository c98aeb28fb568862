"""Stage bookkeeping under a run root: which stages are done, with which config hash, and when.

Each stage writes its artifacts under ``<run_root>/<stage>/`` and, last of all, a marker
``<run_root>/<stage>/_STAGE.json`` holding the config hash of everything the stage depends on and its
timings. A stage is *done* when its marker exists with the expected hash, so an interrupted stage
(no marker yet) reruns, a finished one is skipped, and a changed config reruns it and everything
downstream (their hashes chain).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from . import storage

STAGES = ("prepare", "pretrain", "extract", "cluster", "gan", "generate", "train", "evaluate")
MARKER = "_STAGE.json"


@dataclass
class StageRecord:
    stage: str
    hash: str
    started: str
    finished: str
    seconds: float
    outputs: dict

    @classmethod
    def from_json(cls, d: dict) -> StageRecord:
        return cls(**{k: d[k] for k in ("stage", "hash", "started", "finished", "seconds", "outputs")})


def stage_dir(run_root: str, stage: str) -> str:
    return storage.join(run_root, stage)


def read_record(run_root: str, stage: str) -> StageRecord | None:
    uri = storage.join(run_root, stage, MARKER)
    if not storage.exists(uri):
        return None
    return StageRecord.from_json(storage.read_json(uri))


def is_done(run_root: str, stage: str, expected_hash: str) -> bool:
    rec = read_record(run_root, stage)
    return rec is not None and rec.hash == expected_hash


def write_record(run_root: str, stage: str, stage_hash: str, started: float, outputs: dict) -> StageRecord:
    now = time.time()
    rec = StageRecord(
        stage=stage,
        hash=stage_hash,
        started=datetime.fromtimestamp(started, UTC).isoformat(),
        finished=datetime.fromtimestamp(now, UTC).isoformat(),
        seconds=round(now - started, 3),
        outputs=outputs,
    )
    storage.write_json(storage.join(run_root, stage, MARKER), rec.__dict__)
    return rec


def status_table(run_root: str, expected: dict[str, str] | None = None) -> list[dict]:
    """One row per stage: done / stale (config changed) / pending, with timings."""
    rows = []
    for stage in STAGES:
        rec = read_record(run_root, stage)
        if rec is None:
            state = "pending"
        elif expected is not None and expected.get(stage) not in (None, rec.hash):
            state = "stale"
        else:
            state = "done"
        rows.append(
            {
                "stage": stage,
                "state": state,
                "seconds": rec.seconds if rec else None,
                "finished": rec.finished if rec else None,
            }
        )
    return rows
