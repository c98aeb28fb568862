"""Typed configs: unknown keys and wrong types are clear errors naming the key."""

from dataclasses import dataclass, field

import pytest

from slsr_ray.config import ConfigError, apply_overrides, config_hash, from_dict, to_dict


@dataclass
class Inner:
    lr: float = 0.01
    epochs: int = 3
    policy: str = "inv"


@dataclass
class Outer:
    name: str = "x"
    ks: list[int] = field(default_factory=lambda: [2, 3])
    k: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_from_dict_defaults_and_nested():
    cfg = from_dict(Outer, {"inner": {"lr": 1, "epochs": 5}, "ks": [2, 4]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.epochs == 5 and cfg.ks == [2, 4] and cfg.k is None


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in inner: lrr"):
        from_dict(Outer, {"inner": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        from_dict(Outer, {"bogus": 1})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"inner": {"epochs": "ten"}}, "inner.epochs"),
        ({"inner": {"epochs": 1.5}}, "inner.epochs"),
        ({"ks": [2, "x"]}, r"ks\[1\]"),
        ({"k": "3"}, "k"),
        ({"inner": 5}, "inner"),
    ],
)
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(Outer, data)


def test_overrides_and_hash():
    raw = apply_overrides({}, ["inner.epochs=7", "ks=[3, 5]", "k=4"])
    cfg = from_dict(Outer, raw)
    assert cfg.inner.epochs == 7 and cfg.ks == [3, 5] and cfg.k == 4
    assert config_hash(cfg) == config_hash(from_dict(Outer, to_dict(cfg)))
    assert config_hash(cfg) != config_hash(Outer())
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nonsense"])
