"""Evaluation protocols per dataset: which split a run trains and tests on, how it is scored, and
how many trials (independent train/test splits) the protocol averages over.

============ =============== ====== ===========================================================
dataset      protocol        trials what runs
============ =============== ====== ===========================================================
market1501   single_query    1      one query image per (id, camera) against the gallery
             multi_query     1      the query's (id, camera) images in ``gt_bbox/`` mean-pooled
                                    into one query (Zheng et al. 2015); also reports single-query
synthetic    single_query,   1      as market1501 (``make_synthetic`` writes a ``gt_bbox/``)
             multi_query
dukemtmcreid standard        1      Market rules on the fixed split
msmt17       standard        1      Market rules on the fixed split
folder       standard        1      Market rules on the user's split
cuhk03       classic         20     1,367 train / 100 test ids per split (the mat's ``testsets``),
                                    single-shot CMC: one random gallery image per identity
             new_767_700     1      the 767/700 split of Zhong et al. (Market rules)
viper        ten_trials      10     316/316 random halves of the ids (seeded by ``split_seed``),
                                    camera A queries camera B
============ =============== ====== ===========================================================

A trial trains its own model: in CUHK03 classic and VIPeR the test ids of split *j* are training ids
of split *i*, so a model trained on split *i* is only ever scored on split *i*'s test ids
(:mod:`slsr_ray.trials` runs the pipeline once per split and averages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .base import DatasetError

# How a protocol scores a split (see slsr_ray.evaluate.protocols.evaluate_split).
EVALUATIONS = ("market", "multi_query", "single_shot")


@dataclass(frozen=True)
class Protocol:
    name: str
    evaluation: str  # one of EVALUATIONS
    trials: int  # independent train/test splits the protocol defines (upper bound for cuhk03 classic)
    description: str


_SQ = Protocol("single_query", "market", 1, "single query (Market-1501 rules)")
_MQ = Protocol("multi_query", "multi_query", 1, "multi-query: gt_bbox images mean-pooled per query id and camera")
_STANDARD = Protocol("standard", "market", 1, "the dataset's fixed split (Market-1501 rules)")

PROTOCOLS: dict[str, tuple[Protocol, ...]] = {
    "market1501": (_SQ, _MQ),
    "synthetic": (_SQ, _MQ),
    "dukemtmcreid": (_STANDARD,),
    "msmt17": (_STANDARD,),
    "folder": (_STANDARD,),
    "cuhk03": (
        Protocol("classic", "single_shot", 20, "1,367/100 split, single-shot gallery, 20 trials"),
        Protocol("new_767_700", "market", 1, "767/700 split (Market rules)"),
    ),
    "viper": (Protocol("ten_trials", "market", 10, "random halves of the ids, camera A queries camera B, 10 trials"),),
}


def _key(dataset: str) -> str:
    return dataset.lower().replace("-", "").replace("_", "")


def get_protocol(dataset: str, name: str | None = None) -> Protocol:
    """The protocol ``name`` of ``dataset`` (None: the dataset's first, default protocol)."""
    choices = PROTOCOLS.get(_key(dataset))
    if choices is None:
        raise DatasetError(f"unknown dataset {dataset!r}; protocols are defined for {', '.join(PROTOCOLS)}")
    if name is None:
        return choices[0]
    for p in choices:
        if p.name == name:
            return p
    raise DatasetError(
        f"protocol {name!r} is not defined for dataset {dataset!r}; choose one of {', '.join(p.name for p in choices)}"
    )


def evaluation_of(name: str) -> str:
    """How protocol ``name`` scores a split, whatever the dataset (protocol names are unique per scoring)."""
    found = {p.evaluation for ps in PROTOCOLS.values() for p in ps if p.name == name}
    if not found:
        names = sorted({p.name for ps in PROTOCOLS.values() for p in ps})
        raise DatasetError(f"unknown protocol {name!r}; choose one of {', '.join(names)}")
    return found.pop()


def check_split_id(dataset: str, protocol: Protocol, split_id: int) -> None:
    if not 0 <= split_id < protocol.trials:
        raise DatasetError(
            f"split_id {split_id} is out of range for {dataset} protocol {protocol.name}, which has "
            f"{protocol.trials} split(s): use 0..{protocol.trials - 1}"
        )


def loader_kwargs(dataset: str, protocol: Protocol, split_id: int = 0, split_seed: int = 0,
                  cuhk03_labeled: bool = False) -> dict:
    """The ``load_dataset`` keyword arguments that select ``protocol``'s split ``split_id``."""
    check_split_id(dataset, protocol, split_id)
    key = _key(dataset)
    if key == "cuhk03":
        return {"split_id": split_id, "cuhk03_labeled": cuhk03_labeled,
                "cuhk03_classic_split": protocol.name == "classic"}
    if key == "viper":
        return {"split_id": split_id, "seed": split_seed}
    if protocol.name == "multi_query":
        return {"multi_query": True}
    return {}


def count_splits(dataset: str, root: str, protocol: Protocol) -> int:
    """Splits the dataset at ``root`` really holds for ``protocol`` (CUHK03 classic: the mat's
    ``testsets``, 20 in the release; otherwise the protocol's own count)."""
    if _key(dataset) == "cuhk03" and protocol.name == "classic":
        from .datasets import cuhk03_classic_split_count

        return cuhk03_classic_split_count(os.path.abspath(root))
    return protocol.trials


def load_protocol(dataset: str, root: str, protocol: str | None = None, split_id: int = 0, split_seed: int = 0,
                  cuhk03_labeled: bool = False, **kwargs):
    """:func:`~slsr_ray.data.load_dataset` for split ``split_id`` of ``protocol``; the protocol, its
    split and trial count are recorded in ``ds.extra``."""
    from . import load_dataset

    p = get_protocol(dataset, protocol)
    ds = load_dataset(dataset, root, **loader_kwargs(dataset, p, split_id, split_seed, cuhk03_labeled), **kwargs)
    ds.extra.update({"protocol": p.name, "split_id": split_id, "protocol_trials": p.trials})
    return ds
