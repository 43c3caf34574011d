"""Config to estimator: which ``algorithm.*`` keys reach the chosen estimator, and the rule that none is
set in vain.

``learner.credit`` keeps its estimators pure (keyword hyperparameters, no config objects) and the config
loader in ``common`` does not know the estimators; this module joins the two. The driver and the CLI call
:func:`check_estimator_config` before Ray starts; the learner rank calls :func:`estimator_hparams`.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from common.config import ConfigError
from common.config_sections import CRITIC_FIELDS, ESTIMATOR_HPARAMS, AlgorithmConfig
from learner.credit import ESTIMATORS, get_estimator
from learner.credit_critic import VALUE_TARGETS


def estimator_hparams(algorithm: dict[str, Any]) -> dict[str, Any]:
    """The ``algorithm.*`` hyperparameters (``common.config_sections.ESTIMATOR_HPARAMS``) that the configured
    estimator takes, as its keyword arguments; :func:`check_estimator_config` refuses a non-default value
    for one it does not take, so nothing set in YAML is dropped unseen."""
    accepted = inspect.signature(get_estimator(algorithm["advantage"])).parameters
    return {k: algorithm[k] for k in ESTIMATOR_HPARAMS if k in accepted}


def check_estimator_config(algorithm: AlgorithmConfig, where: str = "algorithm") -> None:
    """``ConfigError`` naming the field: ``advantage`` is not a registered estimator, or a hyperparameter
    the chosen estimator does not take is set to a non-default value (an error, not a no-op).

    The config loader (``common``) does not know the estimators; the driver and the CLI call this before
    Ray starts.
    """
    if algorithm.advantage not in ESTIMATORS:
        close = difflib.get_close_matches(algorithm.advantage, list(ESTIMATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config field `{where}.advantage` = {algorithm.advantage!r}: must be one of "
                          f"{sorted(ESTIMATORS)}{hint}")
    accepted = inspect.signature(ESTIMATORS[algorithm.advantage]).parameters
    defaults = AlgorithmConfig()
    for name in ESTIMATOR_HPARAMS:
        value = getattr(algorithm, name)
        if name not in accepted and value != getattr(defaults, name):
            takers = sorted(e for e, fn in ESTIMATORS.items() if name in inspect.signature(fn).parameters)
            raise ConfigError(f"config field `{where}.{name}` = {value!r}: estimator {algorithm.advantage!r} does "
                              f"not take it (it applies to {', '.join(takers)})")
    if algorithm.advantage not in VALUE_TARGETS:
        for name in CRITIC_FIELDS:
            value = getattr(algorithm, name)
            if value != getattr(defaults, name):
                raise ConfigError(f"config field `{where}.{name}` = {value!r}: estimator {algorithm.advantage!r} "
                                  f"trains no critic (it applies to {', '.join(sorted(VALUE_TARGETS))})")
