from pathlib import Path

import pytest

from common.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_local_yaml_loads_and_every_key_is_commented():
    cfg = load_config(REPO / "deploy/configs/local.yaml")
    assert cfg.algorithm.advantage == "mt_grpo"
    for line in (REPO / "deploy/configs/local.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"YAML key without a comment: {line!r}"


def test_unknown_key_gets_did_you_mean(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"learner\.lrr.*did you mean `lr`"):
        load_config(p)


@pytest.mark.parametrize("override,field", [
    ("learner.lr=-1", "learner.lr"),
    ("algorithm.group_size=1", "algorithm.group_size"),
    ("algorithm.advantage=mt_grpoo", "algorithm.advantage"),
    ("generation.temperature=0", "generation.temperature"),
    ("env.protocol=xml", "env.protocol"),
    ("learner.zero_stage=5", "learner.zero_stage"),
    ("learner.total_steps=ten", "learner.total_steps"),
])
def test_bad_values_name_field_and_rule(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "deploy/configs/local.yaml", [override])
    assert f"`{field}`" in str(e.value)


def test_did_you_mean_for_estimator():
    with pytest.raises(ConfigError, match="did you mean 'mt_grpo'"):
        load_config(None, ["algorithm.advantage=mt_grpoo"])


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(REPO / "deploy/configs/local.yaml", ["learner.lr=0.5", "generation.stop=['</x>']"])
    assert cfg.learner.lr == 0.5 and cfg.generation.stop == ["</x>"]
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_vllm_backend_rejected_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="generators.backend"):
        load_config(None, ["generators.backend=vllm"])
