"""No dead config keys: every field of the config sections is read by code outside the config modules, and
every estimator hyperparameter reaches exactly the estimators that take it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from common import config_sections as C
from common.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONSUMERS = [p for d in ("actors", "learner", "env_workers", "common") for p in (REPO / d).rglob("*.py")
             if p.name not in ("config_sections.py",)]


def _code_without_comments() -> str:
    out = []
    for p in CONSUMERS:
        for line in p.read_text().splitlines():
            out.append(line.split("#", 1)[0])
    return "\n".join(out)


def _fields(cls, prefix: str):
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else None
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            yield from _fields(type(sub), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name, t


def test_every_config_field_is_read_outside_the_config_modules():
    code = _code_without_comments()
    sections = [(f.name, type(f.default_factory())) for f in dataclasses.fields(Config)]  # type: ignore[misc]
    dead = []
    for section, cls in sections:
        for path, name, _ in _fields(cls, f"{section}."):
            if section == "algorithm" and name in C.ESTIMATOR_HPARAMS:
                continue  # read as estimator keywords (learner.worker.estimator_hparams): the test below
            # attribute access (cfg.x.name), a dict key ("name": / ["name"] / .get("name")), or a keyword (name=)
            pattern = rf"(\.{name}\b|[\"']{name}[\"']\s*[:\]]|get\([\"']{name}[\"']|\b{name}\s*=)"
            if not re.search(pattern, code):
                dead.append(path)
    assert not dead, f"config fields no code reads: {dead}"


@pytest.mark.parametrize("estimator", sorted(__import__("learner.credit", fromlist=["ESTIMATORS"]).ESTIMATORS))
def test_estimators_get_exactly_the_hyperparameters_they_take(estimator):
    from learner.credit import ESTIMATORS
    from learner.worker import estimator_hparams

    cfg = load_config(None, [f"algorithm.advantage={estimator}"])
    accepted = set(inspect.signature(ESTIMATORS[estimator]).parameters)
    given = estimator_hparams(vars(cfg.algorithm))
    assert set(given) == accepted & set(C.ESTIMATOR_HPARAMS)
    assert set(accepted) - {"turn_rewards", "outcome_rewards", "turn_mask", "group_ids", "state_ids"} <= set(
        C.ESTIMATOR_HPARAMS), "an estimator keyword the config cannot set"
    for name in set(C.ESTIMATOR_HPARAMS) - accepted:  # a value the estimator would never see is refused
        value = "false" if name == "scale_by_std" else "0.5"
        with pytest.raises(ConfigError, match=rf"`algorithm.{name}`.*does not take it"):
            load_config(None, [f"algorithm.advantage={estimator}", f"algorithm.{name}={value}"])
