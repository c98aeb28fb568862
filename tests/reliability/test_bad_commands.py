"""Bad input on the command line, as a hostile new user types it (issue 20), against one finished run.

Every trial of :data:`TRIALS` runs one ``slsr`` command in-process (typer's CliRunner) and must give:
exit status 2, exactly one ``error: ...`` line on stderr matching the trial's pattern, no traceback,
failure within the trial's time limit (before Ray starts or heavy work begins), and not one changed
file under the finished run (a ``stat`` + small-file hash after each trial; a full byte comparison of
every file at the end). ``fixed`` records whether the trial needed a code change (the count the issue
asks for); the rest were already handled and stay here as guards.

Decisions recorded here:

* A damaged ``_STAGE.json`` marker counts as "not done": ``slsr status`` shows the stage as
  ``corrupt``, a resume reruns it (a warning names the file) and rewrites the marker. A damaged
  ``config.json`` is an error naming the file for ``slsr status`` and ``slsr report``; ``slsr run``
  writes a fresh one (it never reads the old one).
* A dangling symlink in a dataset folder is not an image: it is skipped with a warning naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from slsr_ray import storage
from slsr_ray.cli import app

from . import corpus

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ fixtures


def fingerprint(root: str, full: bool = False) -> dict[str, tuple]:
    """Path -> (size, mtime, inode, sha256 of files under 256 KiB, or of every file with ``full``)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if full or st.st_size < 256 * 1024 else None
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


@pytest.fixture(scope="module")
def finished(tiny_run_root, tmp_path_factory):
    """A tiny run with every stage finished (a copy of the session's shared run: SLSR and the real-only
    baseline), and the fingerprint of all its files."""
    from conftest import TINY_RUN

    root = str(tmp_path_factory.mktemp("finished-run"))
    shutil.copytree(tiny_run_root[0].run_root, root, dirs_exist_ok=True)
    return {"root": root, "overrides": list(TINY_RUN), "full": fingerprint(root, full=True)}


@pytest.fixture(scope="module")
def silent_s3():
    """An "S3 endpoint" that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for c in held:
        c.close()


@dataclass
class Ctx:
    run: str  # the finished run root (must not change)
    overrides: list[str]  # its config
    tmp: Path  # this trial's own folder
    silent_s3: str

    def run_args(self, *extra: str, command: str = "run", root: str | None = None) -> list[str]:
        sets = [a for o in self.overrides for a in ("--set", o)]
        return [command, "--run-root", root or self.run, *sets, *extra]

    def file(self, name: str, data: bytes) -> str:
        return corpus.write(self.tmp / name, data)

    def copy_json_tree(self, damage: str | None = None) -> str:
        """The finished run's JSON files (config and markers) in a new run root, ``damage`` truncated."""
        dst = self.tmp / "run-copy"
        for src in Path(self.run).rglob("*.json"):
            rel = src.relative_to(self.run)
            data = src.read_bytes()
            corpus.write(dst / rel, corpus.truncated(data) if str(rel) == damage else data)
        return str(dst)


@dataclass
class Trial:
    name: str
    args: Callable[[Ctx], list[str]]
    message: str  # regex the one-line error must match
    fixed: bool  # the trial needed a code change
    max_s: float = 20.0
    env: Callable[[Ctx], dict] | None = None


def _features_table(ctx: Ctx) -> str:
    rng = np.random.default_rng(0)
    table = pa.table({"feature": [rng.random(4).astype(np.float32).tolist() for _ in range(5)],
                      "pid": [1, 2, 1, 2, 3], "camid": [0, 0, 1, 1, 1],
                      "split": ["query", "query", "gallery", "gallery", "gallery"]})
    uri = str(ctx.tmp / "features.parquet")
    storage.write_table(uri, table)
    return uri


def _folder(ctx: Ctx, train_rows: list[str]) -> str:
    return corpus.folder_csv_dataset(ctx.tmp / "ds", train_rows)


def _binary_csv(ctx: Ctx) -> str:
    root = _folder(ctx, ["imgs/a.jpg,1,0"])
    corpus.write(os.path.join(root, "train.csv"), corpus.random_bytes())
    return root


def _market(ctx: Ctx, name: str) -> str:
    return corpus.market_file_tree(ctx.tmp / "market", ["0001_c1s1_000001_00.jpg", "0002_c2s1_000002_00.jpg", name])


def _summary(dataset: str, root: str) -> list[str]:
    return ["data", "summary", "--dataset", dataset, "--root", root]


def _manifest(ctx: Ctx) -> str:
    return str(Path(ctx.run) / "prepare" / "train.parquet")


def _no_state_dict(ctx: Ctx) -> str:
    return ctx.file("list.pt", corpus.torch_file([1, 2, 3]))


def _s3_env(ctx: Ctx, **extra: str) -> dict:
    return {"AWS_ENDPOINT_URL": ctx.silent_s3, **extra}


TRIALS = [
    # 1. extraction must check the checkpoint on the driver, before touching the output
    Trial("extract-random-bytes-checkpoint", lambda c: [
        "extract", "--manifest", _manifest(c), "--checkpoint", c.file("bad.pt", corpus.random_bytes()),
        "--output", f"{c.run}/extract/features", "--num-actors", "1"],
        r"bad\.pt is not a torch checkpoint.*\(--checkpoint\): expected a slsr model checkpoint", fixed=True),
    Trial("extract-state-dict-as-checkpoint", lambda c: [
        "extract", "--manifest", _manifest(c), "--checkpoint", c.file("r18.pt", corpus.torch_file(
            corpus.resnet18_state_dict())), "--output", f"{c.run}/extract/features"],
        r"r18\.pt holds no state_dict and config \(--checkpoint\)", fixed=True),
    Trial("extract-missing-checkpoint", lambda c: [
        "extract", "--manifest", _manifest(c), "--checkpoint", str(c.tmp / "nope.pt"),
        "--output", f"{c.run}/extract/features"], r"nope\.pt does not exist", fixed=False),
    Trial("extract-output-is-a-file", lambda c: [
        "extract", "--manifest", _manifest(c), "--random-init", "--output", f"{c.run}/config.json"],
        r"config\.json is a file \(--output\): expected a folder", fixed=False),
    # 2./3. a typo or a bad value on a finished run: nothing written, no Ray, the key named
    Trial("run-unknown-dataset", lambda c: c.run_args("--set", "data.dataset=nosuch"),
          r"unknown dataset 'nosuch' \(data\.dataset\): expected one of market1501", fixed=True),
    *[Trial(f"run-{o}", lambda c, o=o: c.run_args("--set", o), rf"\({re.escape(o.split('=')[0])}\): expected {exp}",
            fixed=True) for o, exp in [
        ("train.lam=-0.5", r"a number >= 0 and <= 1, got -0\.5"),
        ("train.lam=2", r"a number >= 0 and <= 1, got 2\.0"),
        ("cluster.k=500", r"K <= 8, the number of the synthetic dataset's training identities"),
        ("cluster.k=0", r"a number >= 2, got 0"),
        ("generate.count=-5", r"a number >= 0, got -5"),
        ("cluster.rule=bogus", r"one of majority, any, min_share, got 'bogus'"),
        ("evaluate.metric=bogus", r"one of euclidean, cosine, got 'bogus'"),
        ("generate.count=0", r"> 0: strategies \['slsr'\] train on generated images"),
    ]],
    Trial("run-baselines-bogus", lambda c: c.run_args("--set", "baselines=[bogus]"),
          r"\(baselines\[0\]\): expected one of none, lsr, lsro, all_in_one, pseudo, slsr, got 'bogus'", fixed=True),
    Trial("run-from-bogus", lambda c: c.run_args("--from", "bogus"),
          r"unknown stage 'bogus' \(--from\): expected one of prepare, pretrain", fixed=True),
    Trial("run-until-bogus", lambda c: c.run_args("--until", "bogus"), r"unknown stage 'bogus' \(--until\)", fixed=True),
    Trial("run-until-before-from", lambda c: c.run_args("--from", "train", "--until", "prepare"),
          r"nothing to run \(--from train --until prepare\): expected --until must not come before --from", fixed=True),
    Trial("run-pretrained-not-a-state-dict", lambda c: c.run_args("--set", f"train.model.pretrained={_no_state_dict(c)}"),
          r"list\.pt holds a list, not tensors by name \(train\.model\.pretrained\)", fixed=True),
    Trial("run-pretrained-wrong-shape", lambda c: c.run_args("--set", "pretrain.model.pretrained=" + c.file(
        "r18-broken.pt", corpus.torch_file(corpus.resnet18_state_dict(break_key="layer1.0.conv1.weight")))),
        r"r18-broken\.pt does not fit the backbone .*layer1\.0\.conv1\.weight.*\(pretrain\.model\.pretrained\)",
        fixed=True),
    Trial("run-pretrained-missing", lambda c: c.run_args("--set", f"train.model.pretrained={c.tmp / 'gone.pth'}"),
          r"gone\.pth does not exist \(train\.model\.pretrained\)", fixed=True),
    Trial("run-k-above-manifest-identities", lambda c: c.run_args(
        "--set", f"data.manifests={c.run}/prepare", "--set", "cluster.k=9"),
        r"\(cluster\.k\): expected K <= 8, the number of training identities in .*prepare", fixed=True),
    Trial("run-data-root-is-a-file", lambda c: c.run_args(
        "--set", "data.dataset=market1501", "--set", f"data.root={c.run}/config.json"),
        r"config\.json is a file \(data\.root\): expected a folder", fixed=True),
    Trial("run-root-is-a-file", lambda c: ["run", "--run-root", f"{c.run}/config.json"],
          r"config\.json is a file \(run_root\): expected a folder", fixed=False),
    Trial("run-wrong-type", lambda c: c.run_args("--set", "train.lr=fast"), r"train\.lr: expected a number", fixed=False),
    # 4. corrupt JSON in a run root
    Trial("status-truncated-config", lambda c: ["status", c.copy_json_tree("config.json")],
          r"run-copy/config\.json is not valid JSON .*expected a complete JSON file", fixed=True),
    Trial("report-truncated-config", lambda c: ["report", c.copy_json_tree("config.json")],
          r"run-copy/config\.json is not valid JSON", fixed=True),
    # 5. ordinary mistakes in `slsr data synth`
    Trial("synth-one-camera", lambda c: ["data", "synth", str(c.tmp / "s"), "--cams", "1"],
          r"\(--cams\): expected 2\.\.9 cameras.*got 1", fixed=True),
    Trial("synth-zero-ids", lambda c: ["data", "synth", str(c.tmp / "s"), "--num-ids", "0"],
          r"\(--num-ids\): expected at least 2 identities", fixed=True),
    Trial("synth-existing-root", lambda c: ["data", "synth", f"{c.run}/data", "--num-ids", "4"],
          r"already holds a dataset \(root\): expected a new or empty folder; pass --overwrite", fixed=True),
    Trial("synth-zero-height", lambda c: ["data", "synth", str(c.tmp / "s"), "--height", "0"],
          r"\(--height\): expected at least 16 pixels, got 0", fixed=True),
    Trial("synth-root-is-a-file", lambda c: ["data", "synth", f"{c.run}/config.json"],
          r"config\.json is a file \(root\): expected a folder", fixed=True),
    # 5./6. datasets: binary, huge, negative, extra and missing entries
    Trial("folder-binary-csv", lambda c: _summary("folder", _binary_csv(c)),
          r"train\.csv is not UTF-8 text .*expected a UTF-8 CSV file", fixed=True),
    Trial("folder-csv-pid-1e22", lambda c: _summary("folder", _folder(c, ["imgs/a.jpg,10000000000000000000000,0"])),
          r"pid 10000000000000000000000 out of range \(.*train\.csv:2\)", fixed=True),
    Trial("folder-csv-negative-pid", lambda c: _summary("folder", _folder(c, ["imgs/a.jpg,-7,0"])),
          r"pid -7 out of range \(.*train\.csv:2\): expected an identity >= 0 \(or -1 for junk", fixed=True),
    Trial("folder-csv-extra-field", lambda c: _summary("folder", _folder(c, ["imgs/a.jpg,1,0,surprise"])),
          r"4 fields in a row \(.*train\.csv:2\): expected 3 fields", fixed=True),
    Trial("folder-csv-missing-file", lambda c: _summary("folder", _folder(c, ["imgs/a.jpg,1,0", "imgs/zz.jpg,2,1"])),
          r"1 listed image\(s\) do not exist \(line 3: .*zz\.jpg\)", fixed=True),
    Trial("market-pid-1e22", lambda c: _summary("market1501", _market(c, "10000000000000000000000_c1s1_000003_00.jpg")),
          r"pid 1000000000000000000000.* out of range", fixed=True),
    Trial("market-negative-pid", lambda c: _summary("market1501", _market(c, "-5_c1s1_000003_00.jpg")),
          r"pid -5 out of range \(.*-5_c1s1_000003_00\.jpg\)", fixed=True),
    Trial("dataset-root-is-a-file", lambda c: _summary("market1501", f"{c.run}/config.json"),
          r"dataset root .*config\.json is a file \(root\): expected a folder", fixed=True),
    Trial("manifest-output-is-a-file", lambda c: [
        "data", "manifest", "-d", "market1501", "-r", f"{c.run}/data", "-o", f"{c.run}/config.json"],
        r"config\.json is a file \(--output\)", fixed=False),
    # 5. evaluate --out a folder: refused before computing
    Trial("evaluate-out-is-a-folder", lambda c: ["evaluate", "--features", _features_table(c), "--out", str(c.tmp)],
          r"\(--out\): expected a file path, not a folder", fixed=True),
    Trial("evaluate-bad-metric", lambda c: ["evaluate", "--features", _features_table(c), "--metric", "bogus"],
          r"\(--metric\): expected euclidean or cosine", fixed=False),
    # 6. `slsr status` of something that is no run root
    Trial("status-typo-path", lambda c: ["status", f"{c.run}-typo"], r"-typo does not exist \(run root\)", fixed=True),
    Trial("status-on-a-file", lambda c: ["status", f"{c.run}/config.json"],
          r"config\.json is a file \(run root\)", fixed=True),
    Trial("status-missing-bucket", lambda c: ["status", "s3://no-such-bucket-slsr/run"],
          r"S3 bucket no-such-bucket-slsr does not exist \(run root\)", fixed=True),
    Trial("report-typo-path", lambda c: ["report", f"{c.run}-typo"], r"-typo does not exist", fixed=False),
    # 7. an S3 endpoint that never answers fails fast, naming the endpoint
    Trial("s3-silent-endpoint-defaults", lambda c: ["status", "s3://bucket/run"],
          r"S3 endpoint unreachable .*\(http://127\.0\.0\.1:\d+\): expected an S3 endpoint answering within 3 s",
          fixed=True, max_s=15.0, env=_s3_env),
    Trial("s3-silent-endpoint-configured", lambda c: ["status", "s3://bucket/run"],
          r"answering within 3 s \(connect\) / 1 s \(read\), 1 attempt", fixed=True, max_s=5.0,
          env=lambda c: _s3_env(c, SLSR_S3_READ_TIMEOUT="1", SLSR_S3_RETRIES="1")),
    Trial("s3-timeout-not-a-number", lambda c: ["status", "s3://bucket/run"],
          r"bad value 'soon' \(SLSR_S3_READ_TIMEOUT\): expected a positive number", fixed=True,
          env=lambda c: _s3_env(c, SLSR_S3_READ_TIMEOUT="soon")),
    # every other command that writes a folder, fed bad input on top of the finished run
    Trial("cluster-k-1", lambda c: ["cluster", "-f", f"{c.run}/extract/features", "-o", f"{c.run}/cluster", "--k", "1"],
          r"\(--k\): expected cluster counts >= 2", fixed=True),
    Trial("cluster-unfinished-features", lambda c: ["cluster", "-f", str(c.tmp), "-o", f"{c.run}/cluster"],
          r"is not a finished feature extraction", fixed=False),
    Trial("gan-train-missing-clusters", lambda c: ["gan", "train", "-c", str(c.tmp / "k9"), "-o", f"{c.run}/gan"],
          r"cluster assignments .*k9/assignments\.parquet do not exist", fixed=False),
    Trial("gan-generate-zero", lambda c: ["gan", "generate", "-g", f"{c.run}/gan", "-o", f"{c.run}/generate",
                                          "--count", "0"], r"\(--count\): expected a positive number", fixed=False),
    Trial("gan-generate-typo-dir", lambda c: ["gan", "generate", "-g", f"{c.run}/gna", "-o", f"{c.run}/generate"],
          r"gna does not exist \(--gan-dir\)", fixed=False),
    Trial("train-pretrained-random-bytes", lambda c: [
        "train", "-d", "market1501", "-r", f"{c.run}/data", "-o", f"{c.run}/train/slsr", "--backbone", "resnet18",
        "--pretrained", c.file("bad.pth", corpus.random_bytes())],
        r"bad\.pth is not a torch checkpoint .*\(--pretrained\)", fixed=True),
    Trial("train-init-not-a-checkpoint", lambda c: [
        "train", "-d", "market1501", "-r", f"{c.run}/data", "-o", f"{c.run}/train/slsr", "--init", _no_state_dict(c)],
        r"list\.pt holds no state_dict and config \(--init\)", fixed=True),
    Trial("train-lam-out-of-range", lambda c: [
        "train", "-d", "market1501", "-r", f"{c.run}/data", "-o", f"{c.run}/train/slsr", "--lam", "1.5"],
        r"\(--lam\): expected a number in \[0, 1\]", fixed=True),
]


@pytest.fixture
def ctx(finished, silent_s3, moto_server, tmp_path):
    return Ctx(run=finished["root"], overrides=finished["overrides"], tmp=tmp_path, silent_s3=silent_s3)


def invoke(args: list[str], env: dict | None = None):
    start = time.perf_counter()
    result = runner.invoke(app, args, env=env)
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the corpus


@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: t.name)
def test_bad_command(trial: Trial, ctx: Ctx):
    before = fingerprint(ctx.run)
    args = trial.args(ctx)
    result, seconds = invoke(args, env=trial.env(ctx) if trial.env else None)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert result.stdout == "", result.stdout  # failed before doing (or printing) anything
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1 and lines[-1].startswith("error: "), lines
    assert re.search(trial.message, lines[-1]), lines[-1]
    assert seconds < trial.max_s, f"{trial.name} took {seconds:.1f} s to fail"
    assert fingerprint(ctx.run) == before, f"{trial.name} changed the finished run"


def test_corpus_counts():
    """The note of issue 20: how many trials there are and how many needed a fix."""
    names = [t.name for t in TRIALS]
    assert len(names) == len(set(names))
    fixed = sum(t.fixed for t in TRIALS)
    print(f"\n{len(TRIALS)} bad-command trials, {fixed} needed a fix")
    assert 0 < fixed < len(TRIALS)


# ------------------------------------------------------------------------------------------ right results


def test_dangling_symlinks_are_not_images_and_uploads_list_only_what_was_copied(ctx: Ctx):
    root = _market(ctx, "0002_c1s1_000003_00.jpg")
    os.symlink(ctx.tmp / "nowhere.jpg", Path(root) / "bounding_box_train" / "0001_c2s1_000009_00.jpg")
    with pytest.warns(UserWarning, match=r"skipping 1 image name\(s\) that are not files.*0001_c2s1_000009_00"):
        result, _ = invoke(_summary("market1501", root))
    assert result.exit_code == 0 and re.search(r"train\s+2\s+3\s", result.stdout), result.output
    with pytest.warns(UserWarning, match="dangling"):
        result, _ = invoke(["data", "manifest", "-d", "market1501", "-r", root, "-o", str(ctx.tmp / "man"),
                            "--upload-images", str(ctx.tmp / "copy")])
    assert result.exit_code == 0, result.output
    listed = [p for s in ("train", "query", "gallery") for p in
              storage.read_table(str(ctx.tmp / "man" / f"{s}.parquet"))["path"].to_pylist()]
    assert len(listed) == 5 and all(os.path.isfile(p) and p.startswith(str(ctx.tmp / "copy")) for p in listed)
    assert not any("0001_c2s1_000009_00" in p for p in listed)


def test_damaged_marker_counts_as_not_done_and_is_named(ctx: Ctx, caplog):
    root = ctx.copy_json_tree(damage="cluster/_STAGE.json")
    result, _ = invoke(["status", root])
    assert result.exit_code == 0, result.output
    states = dict(re.findall(r"^(\S+)\s+(done|stale|pending|corrupt)\b", result.stdout, re.M))
    assert states["cluster"] == "corrupt" and states["extract"] == "done" and states["train/slsr"] == "done"
    assert any("cluster/_STAGE.json" in r.getMessage() and "will rerun" in r.getMessage() for r in caplog.records)
    # the resume plan reruns the damaged stage and what depends on it, nothing before it
    result, _ = invoke(ctx.run_args("--dry-run", root=root))
    plan = dict(re.findall(r"^(\S+)\s+(done \(skip\)|would run)", result.stdout, re.M))
    assert result.exit_code == 0 and plan["extract"] == "done (skip)" and plan["cluster"] == "would run", result.output


def test_check_prints_the_plan_and_accepts_the_membership_rules(ctx: Ctx):
    result, seconds = invoke(ctx.run_args(command="check"))
    assert result.exit_code == 0 and "config valid" in result.stdout, result.output
    assert re.findall(r"(done \(skip\)|would run)", result.stdout) == ["done (skip)"] * 10
    for rule in ("majority", "any", "min_share"):  # majority is the default: nothing to redo
        result, _ = invoke(ctx.run_args("--set", f"cluster.rule={rule}", "--dry-run"))
        plan = dict(re.findall(r"^(\S+)\s+(done \(skip\)|would run)", result.stdout, re.M))
        redo = "done (skip)" if rule == "majority" else "would run"
        assert plan == {"prepare": "done (skip)", "pretrain": "done (skip)", "extract": "done (skip)",
                        "cluster": redo, "gan": redo, "generate": redo,
                        "train/slsr": redo, "evaluate/slsr": redo,
                        # the real-only baseline does not depend on the clusters
                        "train/none": "done (skip)", "evaluate/none": "done (skip)"}, result.output


def test_valid_weights_pass_the_checks(ctx: Ctx):
    """No false alarms: a real torchvision resnet18 state dict is accepted as ``pretrained``."""
    weights = ctx.file("r18.pth", corpus.torch_file(corpus.resnet18_state_dict()))
    result, _ = invoke(ctx.run_args("--set", f"pretrained={weights}", command="check"))
    assert result.exit_code == 0 and "config valid" in result.stdout, result.output


def test_user_error_raised_in_a_ray_task_is_one_line(ray_session, capsys):
    """Ray re-raises a worker's error wrapped in its own traceback text: the one error path unwraps it."""
    from slsr_ray.cluster import ClusteringError
    from slsr_ray.errors import report_error

    @ray_session.remote
    def fails():
        raise ClusteringError("K=[9] larger than the number of identities (8)", where="cluster.k")

    with pytest.raises(ClusteringError) as err:
        ray_session.get(fails.remote())
    assert report_error(err.value) == 2
    assert capsys.readouterr().err == "error: K=[9] larger than the number of identities (8) (cluster.k)\n"


def test_staged_folder_on_s3_swaps_only_when_complete(s3_bucket):
    """S3 has no rename: the finished objects are copied in, the marker last; a failure leaves the
    destination as it was and removes the staging prefix."""
    from slsr_ray.staging import staged_folder

    dest = f"{s3_bucket}/run/features"
    for name, data in (("a.parquet", b"old"), ("_SUCCESS", b""), ("notes.txt", b"mine")):
        storage.write_bytes(f"{dest}/{name}", data)
    owned = lambda n: n.endswith(".parquet")  # noqa: E731
    with pytest.raises(RuntimeError, match="half-way"), staged_folder(dest, marker="_SUCCESS", owned=owned) as tmp:
        storage.write_bytes(f"{tmp}/b.parquet", b"new")
        raise RuntimeError("half-way")
    assert storage.listdir(dest) == ["_SUCCESS", "a.parquet", "notes.txt"]
    assert storage.listdir(f"{s3_bucket}/run") == ["features"]
    with staged_folder(dest, marker="_SUCCESS", owned=owned) as tmp:
        storage.write_bytes(f"{tmp}/b.parquet", b"new")
        storage.write_bytes(f"{tmp}/_SUCCESS", b"")
    assert storage.listdir(dest) == ["_SUCCESS", "b.parquet", "notes.txt"]
    assert storage.read_bytes(f"{dest}/notes.txt") == b"mine" and storage.listdir(f"{s3_bucket}/run") == ["features"]


def test_verbose_adds_the_traceback(ctx: Ctx):
    result, _ = invoke(["-v", *ctx.run_args("--set", "train.lam=-0.5")])
    assert result.exit_code == 2 and "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
        "error: invalid config value (train.lam)")
    result, _ = invoke([*ctx.run_args("--set", "train.lam=-0.5"), "--verbose"])  # anywhere on the line
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_job_entry_point_reports_one_line(ctx: Ctx, capsys):
    from slsr_ray.jobs import run_job

    sets = [a for o in ctx.overrides for a in ("--set", o)]
    assert run_job(argv=["--run-root", ctx.run, *sets, "--set", "data.dataset=nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith("error: unknown dataset 'nosuch' (data.dataset)")


def test_cli_process_exits_2_with_one_line(ctx: Ctx):
    """The real process: exit status, stderr and time, not just the in-process runner."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slsr_ray.cli", *ctx.run_args("--set", "cluster.k=0")],
                          capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: invalid config value (cluster.k): expected a number >= 2, got 0"]
    assert seconds < 60  # the interpreter and torch import; no Ray, no training


def test_finished_run_is_intact(finished):
    """Last: after every trial above, every file of the finished run is byte-identical and
    ``slsr status`` still shows every stage done."""
    assert fingerprint(finished["root"], full=True) == finished["full"]
    result, _ = invoke(["status", finished["root"]])
    states = re.findall(r"^(\S+)\s+(done|stale|pending|corrupt)\b", result.stdout, re.M)
    assert len(states) == 10 and {s for _, s in states} == {"done"}, result.output

