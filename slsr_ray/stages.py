"""Stage bookkeeping under a run root: which stages are done, with which config hash, and when.

Each stage writes its artifacts under ``<run_root>/<stage>/`` and, last of all, a marker
``<run_root>/<stage>/_STAGE.json`` holding the config hash of everything the stage depends on and its
timings. A stage is *done* when its marker exists with the expected hash, so an interrupted stage
(no marker yet) reruns, a finished one is skipped, and a changed config reruns it and everything
downstream (their hashes chain).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from . import console, layout, storage
from .layout import RunLayout

STAGES = ("prepare", "pretrain", "extract", "cluster", "gan", "generate", "train", "evaluate")
MARKER = layout.STAGE_MARKER
# written when a stage starts, with its config hash: an interrupted run of the *same* config resumes
# from what the stage left (Ray Train checkpoints, GAN epochs, generated images); anything else in the
# stage folder is from another config and is cleared first, so a resume never continues a changed one
RUNNING = "_RUNNING.json"

log = logging.getLogger("slsr_ray.stages")


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
    return RunLayout(run_root).stage(stage)


def read_record(run_root: str, stage: str) -> StageRecord | None:
    """The stage's marker, or None when it has none. A damaged marker (markers are written atomically,
    so only something outside the pipeline damages one) counts as "not done": a warning names the file
    and the stage reruns, rewriting it; ``slsr status`` shows the stage as ``corrupt``."""
    uri = storage.join(stage_dir(run_root, stage), MARKER)
    if not storage.exists(uri):
        return None
    try:
        return StageRecord.from_json(storage.read_json(uri))
    except (storage.CorruptFileError, KeyError, TypeError) as e:
        log.warning("warning: ignoring damaged stage marker %s (%s): stage %s counts as not done and will rerun",
                    uri, e, stage)
        return None


def record_state(run_root: str, stage: str, expected_hash: str | None) -> tuple[str, StageRecord | None]:
    """(``done`` | ``stale`` | ``pending`` | ``corrupt``, the marker) of one stage key."""
    rec = read_record(run_root, stage)
    if rec is None:
        corrupt = storage.exists(RunLayout(run_root).marker(stage))
        return ("corrupt" if corrupt else "pending"), None
    return ("done" if expected_hash in (None, rec.hash) else "stale"), rec


def is_done(run_root: str, stage: str, expected_hash: str) -> bool:
    rec = read_record(run_root, stage)
    return rec is not None and rec.hash == expected_hash


def begin_stage(run_root: str, stage: str, stage_hash: str, force: bool = False) -> bool:
    """Make ``<run_root>/<stage>/`` ready for a run with ``stage_hash``; returns True when it resumes.

    The stage's partial work is kept only when an interrupted run with the same hash left it (and the
    run is not ``force``d); otherwise the folder is emptied: Ray Train restores a finished run from its
    storage path and the GAN actors resume from their checkpoints, so stale state there would silently
    stand in for a changed config."""
    folder = stage_dir(run_root, stage)
    running = storage.join(folder, RUNNING)
    resume = False
    if not force and storage.exists(running):
        try:
            resume = storage.read_json(running).get("hash") == stage_hash
        except (ValueError, storage.StorageError):
            resume = False
    if not resume:
        _set_aside(folder)
    storage.write_json(running, {"stage": stage, "hash": stage_hash,
                                 "started": datetime.now(UTC).isoformat()})
    return resume


def _previous(folder: str) -> str:
    parent, name = os.path.split(folder)
    return os.path.join(parent, f".{name}.previous")


def _set_aside(folder: str) -> None:
    """Clear ``folder`` for a new run of its stage. On a local run root a *finished* earlier result
    (it has a marker) is moved to ``.<name>.previous`` next to it, so that it is not lost before its
    replacement is ready (:func:`run_stage` puts it back if the stage fails); partial leftovers of
    another config are deleted. S3 has no rename (copying a stage's objects would cost more than the
    stage): there the folder is deleted as before."""
    if storage.is_s3(folder) or not storage.exists(storage.join(folder, MARKER)):
        storage.remove(folder)
        return
    storage.remove(_previous(folder))
    os.rename(folder, _previous(folder))


def _restore_previous(folder: str) -> None:
    """After a failed run: the earlier result back in place, without its marker (the stage was asked to
    rerun and did not finish, so it counts as not done; its artifacts are the earlier ones, intact)."""
    prev = _previous(folder)
    if storage.is_s3(folder) or not os.path.isdir(prev):
        return
    storage.remove(folder)
    os.rename(prev, folder)
    storage.remove(storage.join(folder, MARKER))


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
    storage.write_json(RunLayout(run_root).marker(stage), rec.__dict__)
    storage.remove(storage.join(stage_dir(run_root, stage), RUNNING))
    return rec


def run_stage(run_root: str, stage: str, stage_hash: str, fn, force: bool = False, echo=print,
              tag: str = "slsr", label: str | None = None) -> tuple[StageRecord, bool]:
    """Skip, resume or run one stage (every runner's loop body: the pipeline's and the sweep's).

    Skips when the marker holds ``stage_hash`` (unless ``force``); otherwise prepares the folder
    (:func:`begin_stage`), calls ``fn()`` for the outputs and writes the marker last. Returns the
    stage's record and whether it ran; ``label`` names the stage on the console (default: ``stage``). With ``echo=print`` (the console) the "running" line is the console's transient
    status line (:func:`slsr_ray.console.status`: one line per stage in a log, a live line on a terminal)."""
    if console.is_console(echo):
        echo = console.echo
    name = label or stage
    if not force and is_done(run_root, stage, stage_hash):
        echo(f"[{tag}] {name:<18} done (skipped)")
        return read_record(run_root, stage), False
    resumed = begin_stage(run_root, stage, stage_hash, force=force)
    running = f"[{tag}] {name:<18} {'resuming' if resumed else 'running'} ..."
    if echo is console.echo:
        console.status(running, label=name)
    else:
        echo(running)
    started = time.time()
    folder = stage_dir(run_root, stage)
    try:
        outputs = fn()
    except Exception:  # not on Ctrl-C / a kill: an interrupted run keeps its state to resume from
        _restore_previous(folder)
        raise
    rec = write_record(run_root, stage, stage_hash, started, outputs)
    if not storage.is_s3(folder):
        storage.remove(_previous(folder))  # the new result is complete: the earlier one can go
    echo(f"[{tag}] {name:<18} finished in {rec.seconds:.1f}s")
    return rec, True


def status_table(run_root: str, expected: dict[str, str] | None = None) -> list[dict]:
    """One row per stage: done / stale (config changed) / pending, with timings."""
    rows = []
    for stage in STAGES:
        state, rec = record_state(run_root, stage, (expected or {}).get(stage))
        rows.append(
            {
                "stage": stage,
                "state": state,
                "seconds": rec.seconds if rec else None,
                "finished": rec.finished if rec else None,
            }
        )
    return rows
