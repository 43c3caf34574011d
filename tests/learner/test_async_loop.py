"""Asynchronous actor-learner training: the staleness bound holds across producer restarts.

Whatever happens to the producers, every trained row is within ``queue.max_policy_lag`` versions of
the learner, every trained group is complete, and no turn is trained twice.

* Default suite: the real ``AsyncLoop`` and the real replay-queue actor, with a Ray actor standing
  in for the rollout worker (turns at the version its "generators" hold, with pauses) and a learner
  that bumps its version. The producer is killed mid-run; Ray restarts it, and its first call after
  the restart produces turns two versions old (a generator that came back on old weights).
* ``slow``: the real ``learner.trainer.Trainer`` (generator, env worker, rollout worker, DeepSpeed
  learner); the rollout worker and then the generator are killed mid-run.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow as pa
import pytest

from common import metrics as M
from common import schema as S
from common.config import ConfigError, load_config
from tests.common.test_replay_queue import batch, turn_row

REPO = Path(__file__).resolve().parents[2]
G, PROMPTS, LAG = 2, 2, 1


def tiny_async_config(policy: Path, tmp: Path, *extra: str):
    return load_config(REPO / "deploy/configs/local.yaml", [
        f"model.path={policy}", f"data.dir={tmp / 'data'}", "data.num_people=60", "data.num_cities=10",
        "data.num_countries=4", f"run.run_dir={tmp / 'run'}", "rollout.mode=async", f"queue.max_policy_lag={LAG}",
        f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={G}", f"learner.micro_batch_size={G}",
        "generation.max_tokens_per_turn=6", "generation.max_tokens_per_episode=400", "generators.torch_threads=1",
        "generators.num_cpus=0.5", "learner.torch_threads=1", "learner.num_cpus=0.5", "env.num_cpus=0.25",
        "metrics.enabled=false", *extra])


def test_async_mode_needs_room_to_run_ahead():
    with pytest.raises(ConfigError, match=r"`queue.max_policy_lag` = 0.*rollout.mode async"):
        load_config(REPO / "deploy/configs/local.yaml", ["rollout.mode=async", "queue.max_policy_lag=0"])


def check_trained(trained: list[tuple[int, pa.Table]]) -> list[int]:
    """Assert every trained table holds PROMPTS complete groups of G complete episodes and no turn twice;
    return each table's lag (learner version minus its oldest turn's version)."""
    seen: set[tuple[int, int]] = set()
    for _, t in trained:
        rows = t.to_pylist()
        groups = {r[S.GROUP_ID] for r in rows}
        assert len(groups) == PROMPTS
        for gid in groups:
            eps = {r[S.EPISODE_ID] for r in rows if r[S.GROUP_ID] == gid}
            assert len(eps) == G
            for eid in eps:
                turns = sorted(r[S.TURN_INDEX] for r in rows if r[S.EPISODE_ID] == eid)
                assert turns == list(range(len(turns)))
                assert [r[S.IS_LAST_TURN] for r in rows if r[S.EPISODE_ID] == eid].count(True) == 1
        keys = {(r[S.EPISODE_ID], r[S.TURN_INDEX]) for r in rows}
        assert len(keys) == len(rows) and not keys & seen
        seen |= keys
    return [version - min(t.column(S.POLICY_VERSION).to_pylist()) for version, t in trained]


class Weights:
    """The version the generators hold (the learner pushes after every update)."""

    def __init__(self) -> None:
        self.version = 0

    def set(self, version: int) -> None:
        self.version = version

    def get(self) -> int:
        return self.version


class SimRollout:
    """Stands in for the RolloutWorker: G two-turn episodes per prompt, each turn at the generators' version.

    After a Ray restart its first call runs on weights two versions old (a generator that came back
    without the latest push): the queue must drop those groups and the loop must sample more.
    """

    def __init__(self, queue, weights, seed: int):
        import ray

        self.queue, self.weights = queue, weights
        self.rng = random.Random(seed)
        self.behind = 2 if ray.get_runtime_context().was_current_actor_reconstructed else 0

    def ping(self) -> bool:
        return True

    def run(self, examples: list[dict], *, group_size: int, first_group_id: int, first_episode_id: int,
            params=None, to_queue: bool = True) -> dict:
        import ray

        behind, self.behind = self.behind, 0
        for turn in (0, 1):
            version = max(0, ray.get(self.weights.get.remote()) - behind)
            time.sleep(0.1 + 0.1 * self.rng.random())  # decoding and the env step
            rows = [turn_row(first_group_id + q, first_episode_id + q * group_size + j, turn, last=turn == 1,
                             version=version, size=group_size)
                    for q in range(len(examples)) for j in range(group_size)]
            ray.get(self.queue.put.remote(batch(rows)))
        n = len(examples) * group_size
        return {"episodes": [{"episode_id": first_episode_id + i, "turns": 2} for i in range(n)], "rows": 2 * n,
                "action_tokens": 0, "seconds": 0.2}


class SimTrainer:
    """What ``AsyncLoop`` uses of ``learner.trainer.Trainer``, with a learner that only counts versions."""

    def __init__(self, cfg, queue, rollout, weights):
        from learner.trainer import QuestionSampler
        from learner.faults import EpisodeAudit

        self.cfg, self.queue, self.rollout, self.weights = cfg, queue, rollout, weights
        self.rollouts = [rollout]
        self.env_workers: list = []  # the scripted rollout holds no env episodes
        self.audit = EpisodeAudit()
        self.sampler = QuestionSampler([{"question": f"q{i}", "answers": ["a"]} for i in range(40)], seed=0)
        self.version = self.group_counter = self.episode_counter = 0
        self.trained: list[tuple[int, pa.Table]] = []
        self.rng = random.Random(1)

    def sampling(self, seed: int | None = None) -> None:
        return None

    def train_on(self, table: pa.Table) -> dict[str, float]:
        self.trained.append((self.version, table))
        time.sleep(0.3 * self.rng.random())
        self.version += 1
        return {M.POLICY_VERSION: self.version}

    def sync_phase(self) -> float:
        import ray

        ray.get(self.weights.set.remote(self.version))
        return 0.0


def test_lag_bound_holds_when_the_producer_restarts_on_old_weights(ray_local):
    import ray

    from common.replay_queue import ReplayQueue
    from learner.async_loop import AsyncLoop

    cfg = load_config(REPO / "deploy/configs/local.yaml", [
        "rollout.mode=async", f"queue.max_policy_lag={LAG}", f"algorithm.prompts_per_step={PROMPTS}",
        f"algorithm.group_size={G}", f"learner.micro_batch_size={G}"])
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(**cfg.queue.queue_kwargs())
    weights = ray.remote(Weights).options(num_cpus=0).remote()
    rollout = ray.remote(SimRollout).options(num_cpus=0, max_restarts=1).remote(queue, weights, 0)
    trainer = SimTrainer(cfg, queue, rollout, weights)
    loop = AsyncLoop(trainer, poll_s=0.1)
    try:
        for step in range(1, 7):
            stats = loop.step(step)
            if step == 2:
                assert stats[M.ROLLOUT_IN_FLIGHT] > 0  # a call is running: kill the producer mid-run
                ray.kill(rollout, no_restart=False)
        loop.close()
        q = ray.get(queue.stats.remote())
    finally:
        for actor in (queue, weights, rollout):
            ray.kill(actor)

    assert loop.failed_calls >= 1 and stats[M.ROLLOUT_FAILED_CALLS] == loop.failed_calls
    assert q[M.QUEUE_DROPPED_STALE] >= 1  # the restarted producer's old-weights groups never reached the learner
    lags = check_trained(trainer.trained)
    assert len(lags) == 6 and max(lags) <= LAG and lags == loop.trained_lags
    assert q[M.POLICY_LAG_RELEASED_MAX] <= LAG
    assert stats[M.EPISODES_TOTAL] == 6 * PROMPTS * G and trainer.audit.duplicates == 0


@pytest.mark.slow
def test_lag_bound_holds_across_rollout_worker_and_generator_restarts(tiny_policy, ray_local, tmp_path):
    import ray

    from env_workers.prepare import prepare_data
    from learner.async_loop import AsyncLoop
    from learner.trainer import Trainer

    cfg = tiny_async_config(tiny_policy, tmp_path)
    trainer = Trainer(cfg, tmp_path / "run", prepare_data(cfg.data))
    trained: list[tuple[int, pa.Table]] = []
    train_on = trainer.train_on

    def recording_train_on(table: pa.Table) -> dict[str, float]:
        trained.append((trainer.version, table))
        return train_on(table)

    trainer.train_on = recording_train_on
    try:
        loop = AsyncLoop(trainer, poll_s=0.2)
        stats = loop.step(1)
        assert stats[M.ROLLOUT_IN_FLIGHT] > 0  # generation was already running ahead of the learner
        ray.kill(trainer.rollout, no_restart=False)  # mid-run: the next prompts were just handed over
        loop.step(2)
        ray.kill(trainer.generators[0], no_restart=False)
        for step in (3, 4):
            stats = loop.step(step)
        queue = ray.get(trainer.queue.stats.remote())
        restarts = trainer.restarts.sample()
        gen_versions = ray.get([g.version.remote() for g in trainer.generators])
        loop.close()
    finally:
        trainer.close()

    assert loop.failed_calls >= 1 and stats[M.ROLLOUT_FAILED_CALLS] == loop.failed_calls
    assert restarts[M.ACTOR_RESTARTS_ROLE.format(role="rollout")] >= 1
    assert restarts[M.ACTOR_RESTARTS_ROLE.format(role="generator")] >= 1
    assert trainer.version == 4 and gen_versions == [4]
    # the bound, from the rows the learner actually trained on; complete groups, each turn trained once
    lags = check_trained(trained)
    assert len(lags) == 4 and max(lags) <= LAG and lags == loop.trained_lags
    assert queue[M.POLICY_LAG_RELEASED_MAX] <= LAG


def test_async_learner_sees_the_rows_produced_with_their_own_logprobs_and_versions(tiny_policy, ray_local,
                                                                                    tmp_path):
    """What a learner step receives in asynchronous mode, against what the generators produced.

    Real Trainer (generator, env worker, queue, rollout worker, DeepSpeed learner). For every trained
    row: its log-probs are those of the weights of the version it claims (a fresh forward of the
    learner's weights at that version), it is trained once, its lag is within the bound; and the step's
    ``rollout/*`` metrics are those of the episodes it trained on, so no two steps report one rollout.
    """
    import ray
    import torch

    from common.modeling import load_model
    from env_workers.prepare import prepare_data
    from learner.async_loop import AsyncLoop
    from learner.batch import assemble
    from learner.trainer import Trainer
    from learner.evaluation import episode_metrics
    from learner.evaluation import episode_summaries

    cfg = tiny_async_config(tiny_policy, tmp_path, "learner.lr=0.05", "generation.max_tokens_per_turn=8")
    trainer = Trainer(cfg, tmp_path / "run", prepare_data(cfg.data))
    weights = {0: ray.get(trainer.learners[0].state_dict.remote())}
    trained: list[tuple[int, pa.Table]] = []
    train_on = trainer.train_on

    def recording_train_on(table: pa.Table) -> dict[str, float]:
        trained.append((trainer.version, table))
        out = train_on(table)
        weights[trainer.version] = ray.get(trainer.learners[0].state_dict.remote())
        return out

    trainer.train_on = recording_train_on
    steps = []
    try:
        loop = AsyncLoop(trainer, poll_s=0.2)
        for step in range(1, 5):
            steps.append(loop.step(step))
        loop.close()
    finally:
        trainer.close()

    lags = check_trained(trained)
    assert max(lags) <= LAG and lags == loop.trained_lags and max(lags) == 1  # generation did run ahead
    model = load_model(str(tiny_policy)).eval()
    checked = 0
    for (_, table), stats in zip(trained, steps):
        batch = assemble(table, pad_id=0)
        turn_version = torch.gather(batch.versions, 1, batch.token_turn.clamp(min=0))[:, 1:]  # [B, T-1]
        acting = batch.action_mask[:, 1:] > 0  # [B, T-1] token t+1 was sampled by the policy
        for v in sorted(set(table.column(S.POLICY_VERSION).to_pylist())):
            model.load_state_dict(weights[v])
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            fresh = torch.log_softmax(logits.float() / cfg.generation.temperature, -1).gather(
                -1, batch.input_ids[:, 1:, None])[..., 0]  # [B, T-1]
            mine = acting & (turn_version == v)
            torch.testing.assert_close(fresh[mine], batch.behaviour_logprobs[:, 1:][mine], atol=1e-4, rtol=0)
            checked += int(mine.sum())
        expected = episode_metrics(episode_summaries(table))
        assert {k: stats[k] for k in expected} == pytest.approx(expected)
    assert checked == sum(int((assemble(t, 0).action_mask[:, 1:] > 0).sum()) for _, t in trained)
    # the generation figures come from rollout calls that finished during the step, never carried over
    reported = [s for s in steps if M.TIME_ROLLOUT in s]
    assert reported and len({s[M.TIME_ROLLOUT] for s in reported}) == len(reported)


def test_two_rollout_workers_run_calls_at_once_within_the_lag_bound(ray_local):
    """rollout.num_workers = 2: the loop's two calls of the lag budget go to different workers and run at
    the same time; every trained group is complete, within the bound, and trained once."""
    import ray

    from common.replay_queue import ReplayQueue
    from learner.async_loop import AsyncLoop

    cfg = load_config(REPO / "deploy/configs/local.yaml", [
        "rollout.mode=async", "rollout.num_workers=2", f"queue.max_policy_lag={LAG}",
        f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={G}", f"learner.micro_batch_size={G}"])
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(**cfg.queue.queue_kwargs())
    weights = ray.remote(Weights).options(num_cpus=0).remote()
    workers = [ray.remote(SimRollout).options(num_cpus=0).remote(queue, weights, s) for s in (0, 1)]
    trainer = SimTrainer(cfg, queue, workers[0], weights)
    trainer.rollouts = workers
    loop = AsyncLoop(trainer, poll_s=0.1)
    overlapped = []
    try:
        for step in range(1, 6):
            loop.top_up()
            overlapped.append({c.worker for c in loop.calls})
            loop.step(step)
        loop.close()
    finally:
        for actor in (queue, weights, *workers):
            ray.kill(actor)
    assert {0, 1} in overlapped  # both workers had a call out at the same time
    lags = check_trained(trainer.trained)
    assert len(lags) == 5 and max(lags) <= LAG and trainer.audit.duplicates == 0


def test_rollout_workers_config_rules():
    with pytest.raises(ConfigError, match=r"`rollout.num_workers` = 2.*rollout.mode async"):
        load_config(REPO / "deploy/configs/local.yaml", ["rollout.num_workers=2"])
    with pytest.raises(ConfigError, match=r"`rollout.num_workers` = 3.*max_policy_lag \+ 1 = 2"):
        load_config(REPO / "deploy/configs/local.yaml", ["rollout.mode=async", "rollout.num_workers=3"])
