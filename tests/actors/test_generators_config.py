"""The generators section of the config: the session/streaming knobs and their rules."""

import pytest

from common.config import ConfigError, load_config


def test_defaults_streaming_off():
    g = load_config(None, []).generators
    assert g.streaming is False and g.keep_kv_across_versions is False
    assert g.kv_budget_tokens >= 64 and g.max_prefill_tokens >= 1


@pytest.mark.parametrize("overrides, field", [
    (["generators.kv_budget_tokens=10"], "generators.kv_budget_tokens"),
    (["generators.max_prefill_tokens=0"], "generators.max_prefill_tokens"),
    (["generators.vllm_gpu_memory_utilization=1.5"], "generators.vllm_gpu_memory_utilization"),
])
def test_impossible_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)
