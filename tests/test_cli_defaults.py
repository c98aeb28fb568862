"""The CLI's option defaults are the config dataclasses' defaults (issue 15: `slsr train` once defaulted
`max_failures=1` while `TrainConfig` said 0). Every option whose name (or its rename below) is a field
of the command's config dataclasses must carry that field's default."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from slsr_ray.commands import experiment as experiment_cmd
from slsr_ray.commands import extract as extract_cmd
from slsr_ray.commands import gan as gan_cmd
from slsr_ray.commands import sweep as sweep_cmd
from slsr_ray.commands import train as train_cmd
from slsr_ray.experiment import ExperimentConfig
from slsr_ray.extract import ExtractConfig
from slsr_ray.gan import GanConfig
from slsr_ray.models import ModelConfig
from slsr_ray.pipeline import ClusterSection
from slsr_ray.train import TrainConfig
from slsr_ray.tune import SweepConfig

# command, the dataclasses its options fill, option name -> field name where they differ
COMMANDS = [
    (train_cmd.train, [TrainConfig, ModelConfig], {"workers": "num_workers", "gpu": "use_gpu"}),
    (gan_cmd.train, [GanConfig], {}),
    (extract_cmd.extract, [ExtractConfig], {}),
    (extract_cmd.cluster, [ClusterSection], {"k": "ks", "sample_size": "silhouette_sample"}),
    (sweep_cmd.sweep, [SweepConfig], {}),
    (experiment_cmd.experiment, [ExperimentConfig], {}),
]


def _field_default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if field is None:
        return dataclasses.MISSING
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _empty(value) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict)) and not value)


def _option_default(param):
    default = getattr(param.default, "default", param.default)
    return None if default is ... else default


@pytest.mark.parametrize("command, classes, renames", COMMANDS, ids=lambda x: getattr(x, "__qualname__", ""))
def test_cli_defaults_are_the_dataclass_defaults(command, classes, renames):
    checked, drift = [], []
    for name, param in inspect.signature(command).parameters.items():
        field = renames.get(name, name)
        for cls in classes:
            expected = _field_default(cls, field)
            if expected is dataclasses.MISSING:
                continue
            got = _option_default(param)
            if isinstance(expected, (list, tuple)) and got is not None:
                got, expected = list(got), list(expected)
            checked.append(name)
            if got != expected and not (_empty(got) and _empty(expected)):  # [] / None / {}: "none given"
                drift.append(f"--{name.replace('_', '-')}: CLI {got!r}, {cls.__name__}.{field} {expected!r}")
            break
    assert not drift, f"{command.__module__}.{command.__name__} defaults drift:\n" + "\n".join(drift)
    assert len(checked) >= 2, f"{command.__name__}: no option matched a config field (renamed?)"
