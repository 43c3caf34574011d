from pathlib import Path

import pytest

from common.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deploy/configs/local.yaml"


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
    ("generation.temperature=0", "generation.temperature"),
    ("env.protocol=xml", "env.protocol"),
    ("learner.zero_stage=5", "learner.zero_stage"),
    ("learner.total_steps=ten", "learner.total_steps"),
    ("queue.stale_mode=keep", "queue.stale_mode"),
    ("rollout.partial_rollouts=drop", "rollout.partial_rollouts"),
    ("rollout.max_aborts_per_episode=-1", "rollout.max_aborts_per_episode"),
    ("queue.stale_decay=0", "queue.stale_decay"),
    ("queue.capacity_bytes=0", "queue.capacity_bytes"),
    ("queue.put_timeout_s=0", "queue.put_timeout_s"),
    ("rollout.mode=asynchronous", "rollout.mode"),
    ("env.step_latency_s=-1", "env.step_latency_s"),
    ("metrics.report_to=[tb]", "metrics.report_to"),
    ("metrics.report_to=[wandb,wandb]", "metrics.report_to"),
    ("metrics.wandb_mode=online", "metrics.wandb_mode"),
])
def test_bad_values_name_field_and_rule(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "deploy/configs/local.yaml", [override])
    assert f"`{field}`" in str(e.value)


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


def test_cross_section_rules_fail_at_load_naming_fields_values_and_rules():
    """Placement and weight-sync rules run in Config.validate, i.e. before Ray starts."""
    from common.config import weight_sync_mode

    with pytest.raises(ConfigError, match=r"`generators.num` = 2: with placement.colocate"):
        load_config(None, ["learner.num_ranks=1", "generators.num=2", "placement.colocate=true"])
    with pytest.raises(ConfigError, match=r"`learner.weight_sync` = 'bcast': must be auto, object_store or broadcast"):
        load_config(None, ["learner.weight_sync=bcast"])
    colocated = ["learner.num_gpus=0.5", "generators.num_gpus=0.5", "placement.colocate=true"]
    with pytest.raises(ConfigError, match=r"`learner.weight_sync` = 'broadcast' with `placement.colocate` = true"):
        load_config(None, colocated + ["learner.weight_sync=broadcast"])
    # auto: broadcast (NCCL) only when both ends have GPUs of their own; gloo when asked for on CPU
    assert weight_sync_mode(load_config(None, [])) == ("object_store", None)
    assert weight_sync_mode(load_config(None, colocated)) == ("object_store", None)
    assert weight_sync_mode(load_config(None, ["learner.num_gpus=1", "generators.num_gpus=1"])) == ("broadcast", "nccl")
    assert weight_sync_mode(load_config(None, ["learner.weight_sync=broadcast"])) == ("broadcast", "gloo")
    half = ["learner.num_gpus=0.5", "generators.num_gpus=0.5"]  # Ray may put both on one device
    assert weight_sync_mode(load_config(None, half)) == ("object_store", None)
    with pytest.raises(ConfigError, match=r"`learner.weight_sync` = 'broadcast' with learner.num_gpus = 0.5.*whole GPUs"):
        load_config(None, half + ["learner.weight_sync=broadcast"])


def test_queue_section_configures_the_replay_queue():
    from common.replay_queue import ReplayQueue

    cfg = load_config(REPO / "deploy/configs/local.yaml", [
        "queue.stale_mode=reweight", "queue.stale_decay=0.25", "queue.capacity_bytes=1000000",
        "queue.memory_bytes=5000", "queue.put_timeout_s=3"])
    q = ReplayQueue(**cfg.queue.queue_kwargs())  # the driver builds the actor exactly so
    s = q.store
    assert (s.stale_mode, s.stale_decay, s.capacity_bytes, s.memory_bytes) == ("reweight", 0.25, 1000000, 5000)
    assert (s.capacity_rows, s.max_policy_lag, q.put_timeout_s) == (100000, 1, 3.0)


def test_float_fields_accept_every_spelling_a_user_writes():
    # YAML 1.1 reads 1e-6 (no dot) as a string; the paper writes the learning rate that way
    for text, want in (("1e-6", 1e-6), ("1.0e-6", 1e-6), ("5E-4", 5e-4), (".5", 0.5), ("3", 3.0)):
        cfg = load_config(None, [f"learner.lr={text}"])
        assert cfg.learner.lr == pytest.approx(want) and isinstance(cfg.learner.lr, float)
    with pytest.raises(ConfigError, match=r"`learner.lr`.*must be a number"):
        load_config(None, ["learner.lr=fast"])
    with pytest.raises(ConfigError, match=r"`learner.lr`.*finite"):
        load_config(None, ["learner.lr=inf"])


def test_push_every_is_checked_against_the_lag_bound():
    load_config(None, ["learner.push_every=2", "queue.max_policy_lag=1"])  # sync: rows lag by at most 1
    with pytest.raises(ConfigError, match=r"`learner.push_every` = 3.*queue.max_policy_lag = 1"):
        load_config(None, ["learner.push_every=3", "queue.max_policy_lag=1"])
    with pytest.raises(ConfigError, match=r"`learner.push_every` = 2.*rollout.mode async"):
        load_config(None, ["rollout.mode=async", "learner.push_every=2", "queue.max_policy_lag=1"])
    load_config(None, ["rollout.mode=async", "learner.push_every=2", "queue.max_policy_lag=2"])


def test_off_policy_rules():
    cfg = load_config(None, ["algorithm.off_policy=tis", "algorithm.is_cap=5"])
    assert cfg.algorithm.off_policy == "tis" and cfg.algorithm.is_cap == 5.0
    with pytest.raises(ConfigError, match=r"`algorithm.off_policy` = 'is'"):
        load_config(None, ["algorithm.off_policy=is"])
    with pytest.raises(ConfigError, match=r"`algorithm.is_cap`.*tis or decoupled only"):
        load_config(None, ["algorithm.is_cap=5"])
    with pytest.raises(ConfigError, match=r"`learner.recompute_old_logprobs`.*implied"):
        load_config(None, ["algorithm.off_policy=decoupled", "learner.recompute_old_logprobs=true"])
    with pytest.raises(ConfigError, match=r"`algorithm.clip_ratio_c`.*> 1"):
        load_config(None, ["algorithm.clip_ratio_c=0.5"])
    assert load_config(None, ["algorithm.clip_ratio_c=null"]).algorithm.clip_ratio_c is None
    with pytest.raises(ConfigError, match=r"`learner.prefix_sharing`.*zero_stage <= 2"):
        load_config(None, ["learner.zero_stage=3"])


def test_torch_threads_auto_splits_the_cores_by_mode():
    from common.config import torch_threads

    assert torch_threads(load_config(None, []), cores=2) == (2, 2)  # sync: the roles take turns
    assert torch_threads(load_config(None, ["rollout.mode=async"]), cores=2) == (1, 1)  # async: they overlap
    assert torch_threads(load_config(None, ["rollout.mode=async", "generators.num=2"]), cores=16) == (4, 8)
    assert torch_threads(load_config(None, ["generators.torch_threads=3"]), cores=2) == (3, 2)  # explicit wins
    cluster = load_config(None, ["ray.address=auto", "generators.num_cpus=4", "learner.num_cpus=8"])
    assert torch_threads(cluster, cores=2) == (4, 8)  # a cluster: what Ray reserved


def test_kl_keys_are_live_only_with_a_coefficient(tmp_path):
    cfg = load_config(None, ["algorithm.kl_coef=0.05", "algorithm.kl_kind=k2"])
    assert cfg.algorithm.kl_kind == "k2"
    with pytest.raises(ConfigError, match=r"`algorithm.kl_coef` = 0.0.*unused"):
        load_config(None, ["algorithm.kl_kind=k1"])
    with pytest.raises(ConfigError, match=r"`algorithm.kl_coef` = 0.0.*unused"):
        load_config(None, [f"algorithm.ref_model_path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"`algorithm.kl_kind`.*k1, k2 or k3"):
        load_config(None, ["algorithm.kl_coef=0.1", "algorithm.kl_kind=k4"])


@pytest.mark.parametrize(("overrides", "field", "rule"), [
    (["judge.turn_weight=0.7"], "judge.turn_weight", "applies only with judge.enabled: true"),
    (["judge.enabled=true", "judge.turn_weight=0"], "judge.turn_weight", "must be > 0 when the judge is enabled"),
    (["judge.enabled=true", "judge.turn_weight=-1"], "judge.turn_weight", "must be >= 0"),
    (["judge.enabled=true", "judge.turn_weight=1", "judge.temperature=0.7"], "judge.temperature",
     "does not apply to judge.mode 'likelihood'"),
    (["judge.enabled=true", "judge.mode=generative", "judge.yes_token=oui"],
     "judge.yes_token", "does not apply to judge.mode 'generative'"),
    (["judge.enabled=true", "judge.turn_weight=1", "judge.mode=generative", "judge.max_batch_tokens=4096"],
     "judge.max_batch_tokens", "applies only to judge.backend 'hf' in mode 'likelihood'"),
    (["judge.enabled=true", "judge.turn_weight=1", "judge.mode=grm"], "judge.mode", "must be 'likelihood' or"),
    (["judge.enabled=true", "judge.turn_weight=1", "judge.timeout_s=0"], "judge.timeout_s", "must be > 0"),
    (["judge.enabled=true", "judge.turn_weight=1", "judge.max_batch_tokens=100"], "judge.max_batch_tokens",
     "one prompt must fit a forward"),
    (["faults.kill=[{actor: judge, index: 0, after_step: 0}]"], "faults.kill[0].actor", "needs judge.enabled"),
    (["judge.enabled=true", "judge.turn_weight=1", "faults.kill=[{actor: judge, index: 1, after_step: 0}]"],
     "faults.kill[0].index", "must be < 1"),
])
def test_judge_section_rules_name_the_field(overrides, field, rule):
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, overrides)
    assert f"`{field}`" in str(e.value) and rule in str(e.value)


def test_enabling_the_judge_alone_scores_search_turns():
    cfg = load_config(LOCAL, ["judge.enabled=true"])  # `turnrl train ... judge.enabled=true` is a valid run
    assert cfg.judge.turn_weight == 0.5 and cfg.judge.outcome_weight == 0.0


def test_judge_section_turns_into_actor_and_client_arguments():
    from learner.trainer import judge_actor_kwargs, judge_client_kwargs

    cfg = load_config(LOCAL, ["judge.enabled=true", "judge.turn_weight=0.5", "judge.mode=generative",
                              "judge.temperature=0.7", "judge.num_cpus=2", "judge.batch_size=8"])
    a, c = judge_actor_kwargs(cfg), judge_client_kwargs(cfg)
    assert a["mode"] == "generative" and a["temperature"] == 0.7 and a["torch_threads"] == 2
    assert c["turn_weight"] == 0.5 and c["outcome_weight"] == 0.0 and c["batch_size"] == 8
    assert c["turn_template"] is None  # the built-in template
