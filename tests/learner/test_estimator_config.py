"""learner/estimator_config.py: every estimator hyperparameter reaches exactly the estimators that take it,
and a value one would never see, or an unknown estimator, is a config error naming the field."""

from __future__ import annotations

import inspect

import pytest

from common import config_sections as C
from common.config import ConfigError, load_config
from learner.credit import ESTIMATORS
from learner.estimator_config import check_estimator_config, estimator_hparams


def _load(*overrides: str):
    if "algorithm.advantage=tree_grpo" in overrides:  # the tree estimator needs tree rollouts
        overrides += ("rollout.tree.branch_turns=[1]",)
    cfg = load_config(None, list(overrides))
    check_estimator_config(cfg.algorithm)
    return cfg


def test_an_unknown_estimator_names_the_field_with_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"`algorithm.advantage` = 'mt_grpoo'.*did you mean 'mt_grpo'"):
        _load("algorithm.advantage=mt_grpoo")


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_estimators_get_exactly_the_hyperparameters_they_take(estimator):
    cfg = _load(f"algorithm.advantage={estimator}")
    accepted = set(inspect.signature(ESTIMATORS[estimator]).parameters)
    given = estimator_hparams(vars(cfg.algorithm))
    assert set(given) == accepted & set(C.ESTIMATOR_HPARAMS)
    inputs = {"turn_rewards", "outcome_rewards", "turn_mask", "group_ids", "state_ids", "values", "node_ids"}
    assert set(accepted) - inputs <= set(C.ESTIMATOR_HPARAMS), "an estimator keyword the config cannot set"
    for name in set(C.ESTIMATOR_HPARAMS) - accepted:  # a value the estimator would never see is refused
        value = "false" if name in ("scale_by_std", "whiten") else "0.5"
        with pytest.raises(ConfigError, match=rf"`algorithm.{name}`.*does not take it"):
            _load(f"algorithm.advantage={estimator}", f"algorithm.{name}={value}")


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_critic_settings_are_refused_where_no_critic_is_trained(estimator):
    from learner.credit_critic import VALUE_TARGETS

    for override in ("algorithm.critic_lr=0.01", "algorithm.critic_value_clip=null",
                     "algorithm.critic_model_path=/some/critic"):
        if estimator in VALUE_TARGETS:
            _load(f"algorithm.advantage={estimator}", override)
        else:
            with pytest.raises(ConfigError, match=r"trains no critic \(it applies to mt_ppo, ppo\)"):
                _load(f"algorithm.advantage={estimator}", override)


@pytest.mark.parametrize("override,rule", [("algorithm.lam=1.5", "must be in [0, 1]"),
                                           ("algorithm.critic_lr=0", "must be > 0"),
                                           ("algorithm.critic_value_clip=-1", "must be > 0, or null")])
def test_critic_values_out_of_range_name_the_field(override, rule):
    with pytest.raises(ConfigError) as e:
        _load("algorithm.advantage=mt_ppo", override)
    assert f"`{override.split('=')[0]}`" in str(e.value) and rule in str(e.value), str(e.value)
