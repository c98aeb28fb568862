"""Multi-trial protocols (CUHK03 classic: 20 splits, VIPeR: 10 halves): one whole pipeline per split.

A trial is a train/test split of its own. Split *j*'s test identities are training identities of
split *i* (CUHK03 classic, VIPeR), so a model trained on split *i* -- and the step-1 model, the
clusters and the GANs built from split *i*'s training images -- must never see split *j*'s test set.
``evaluate.trials = N`` therefore runs :func:`~slsr_ray.pipeline.run_pipeline` unchanged for splits
0..N-1, each under its own run root ``<run_root>/split<i>/`` (a config with ``data.split_id = i`` and
``evaluate.trials = 1``, so ``slsr run --set data.split_id=i --run-root <run_root>/split<i>`` is the
same run and resumes it), then averages every strategy's metrics over the trials::

    <run_root>/split<i>/...                       a complete run per split (its own report)
    <run_root>/trials/results.json                protocol, splits, mean and std per strategy and mode
    <run_root>/trials/results.md                  the table (mean±std, in %)
    <run_root>/trials/<strategy>/<mode>.json      mean, std and the per-split values of one mode

The std is the population std over trials (``numpy.std``), as :func:`~slsr_ray.evaluate.aggregate_trials`.
"""

from __future__ import annotations

import dataclasses

from . import storage
from .config import ConfigError
from .layout import RunLayout

MODES = ("plain", "rerank", "single_query", "single_query_rerank")


def trial_root(run_root: str, split_id: int) -> str:
    return RunLayout(run_root).trial(split_id).root


def trial_config(cfg, split_id: int):
    """The pipeline config of one trial: split ``split_id`` under ``<run_root>/split<split_id>``."""
    return dataclasses.replace(
        cfg,
        run_root=trial_root(cfg.run_root, split_id),
        data=dataclasses.replace(cfg.data, split_id=split_id),
        evaluate=dataclasses.replace(cfg.evaluate, trials=1),
    )


def check_trials(cfg) -> int:
    """The number of trials to run; ConfigError when the protocol or the dataset has fewer splits."""
    from .data.protocols import count_splits, get_protocol

    protocol = get_protocol(cfg.data.dataset, cfg.data.protocol)
    n = cfg.evaluate.trials
    if n < 1:
        raise ConfigError(f"evaluate.trials must be >= 1, got {n}")
    if n > protocol.trials:
        raise ConfigError(f"evaluate.trials={n} but {cfg.data.dataset} protocol {protocol.name} has "
                          f"{protocol.trials} split(s)")
    if n > 1 and cfg.data.root and not cfg.data.manifests:
        available = count_splits(cfg.data.dataset, cfg.data.root, protocol)
        if n > available:
            raise ConfigError(f"evaluate.trials={n} but the {cfg.data.dataset} data at {cfg.data.root} defines "
                              f"{available} {protocol.name} split(s)")
    if n > 1 and cfg.data.manifests and "{split_id}" not in cfg.data.manifests:
        raise ConfigError("evaluate.trials > 1 with data.manifests needs one manifest folder per split: put "
                          "{split_id} in data.manifests (e.g. s3://bucket/cuhk03/split{split_id})")
    return n


def run_protocol(cfg, from_stage: str | None = None, until: str | None = None, echo=print) -> dict:
    """Run the pipeline for ``cfg``'s protocol: one split (``evaluate.trials`` 1) or every trial
    followed by their mean and std. Returns the run summary (one split) or the trials summary."""
    from .data.protocols import get_protocol
    from .pipeline import run_pipeline

    protocol = get_protocol(cfg.data.dataset, cfg.data.protocol)
    n = check_trials(cfg)
    if n == 1:
        if protocol.trials > 1:
            echo(f"[slsr] {cfg.data.dataset} protocol {protocol.name}: split {cfg.data.split_id} only, 1 of its "
                 f"{protocol.trials} trials (evaluate.trials={protocol.trials} runs them all)")
        return run_pipeline(cfg, from_stage=from_stage, until=until, echo=echo)
    for i in range(n):
        echo(f"[slsr] trial {i + 1}/{n}: {protocol.name} split {i} under {trial_root(cfg.run_root, i)}")
        run_pipeline(trial_config(cfg, i), from_stage=from_stage, until=until, echo=echo)
    return aggregate(cfg, list(range(n)), echo=echo)


def aggregate(cfg, splits: list[int], echo=print) -> dict:
    """Mean and std over ``splits`` of every strategy's evaluation JSONs, written under ``trials/``."""
    from .data.protocols import get_protocol
    from .evaluate import RankResult, aggregate_trials, format_table

    protocol = get_protocol(cfg.data.dataset, cfg.data.protocol)
    summary = {"protocol": protocol.name, "dataset": cfg.data.dataset, "num_trials": len(splits),
               "splits": splits, "strategies": {}}
    table = {}
    for strategy in cfg.strategies:
        per_mode = {}
        for mode in MODES:
            uris = [RunLayout(cfg.run_root).trial(i).metrics(strategy, mode) for i in splits]
            if not all(storage.exists(u) for u in uris):
                continue
            runs = [storage.read_json(u) for u in uris]
            for i, r in zip(splits, runs, strict=True):
                if r.get("protocol") != protocol.name or r.get("split_id") != i:
                    raise ConfigError(f"{uris[splits.index(i)]} was made by protocol {r.get('protocol')!r} split "
                                      f"{r.get('split_id')!r}, expected {protocol.name!r} split {i}")
            agg = aggregate_trials(runs)
            per_mode[mode] = _aggregate_dict(agg, runs, summary)
            storage.write_json(storage.join(RunLayout(cfg.run_root).trials, strategy, f"{mode}.json"), per_mode[mode])
            table[f"{strategy} {mode}"] = RankResult.from_metrics(agg)
        if per_mode:
            summary["strategies"][strategy] = per_mode
    if not table:
        echo("[slsr] no trial has evaluation results yet (--until stopped before evaluate?)")
        return summary
    text = format_table(table)
    out = RunLayout(cfg.run_root).trials
    storage.write_json(storage.join(out, "results.json"), summary)
    storage.write_text(storage.join(out, "results.md"),
                       f"# {cfg.name}: {cfg.data.dataset} {protocol.name}, mean±std over {len(splits)} trials "
                       f"(splits {splits[0]}..{splits[-1]}), in %\n\n```\n{text}\n```\n")
    echo(f"[slsr] {protocol.name}: mean±std over {len(splits)} trials (in %)\n{text}")
    echo(f"[slsr] trial results: {storage.join(out, 'results.json')}")
    return summary


def _aggregate_dict(agg: dict, runs: list[dict], about: dict) -> dict:
    from .pipeline import _metrics_dict

    mean = _metrics_dict(agg)
    std = _metrics_dict({**agg["std"], "num_valid_queries": 0})
    std.pop("num_valid_queries")
    return {**mean, "std": std, "protocol": about["protocol"], "dataset": about["dataset"],
            "num_trials": len(runs), "splits": about["splits"],
            "trials": [{k: r[k] for k in ("split_id", "rank1", "rank5", "rank10", "rank20", "mAP", "mINP")}
                       for r in runs]}
