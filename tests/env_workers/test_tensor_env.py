"""The tensor turn interface: GymTurnEnv (Gymnasium adapter), the env registry, and TensorEnvWorker as a plain class."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from common.spaces import ActionSpace
from env_workers.arm import ArmThrowEnv
from env_workers.tensor_env import TENSOR_ENVS, GymTurnEnv, TensorStep, make_tensor_env
from env_workers.tensor_worker import TensorEnvWorker

pytest.importorskip("gymnasium")


def run(env, seed: int, policy) -> list[TensorStep]:
    """One episode under ``policy(t) -> action`` (t = step index)."""
    env.reset(seed)
    steps = []
    for t in range(10_000):
        st = env.step(np.array([policy(t)]))
        steps.append(st)
        if st.done:
            return steps
    raise AssertionError("the episode did not end")


def turn_lengths(steps: list[TensorStep]) -> list[int]:
    out, n = [], 0
    for st in steps:
        n += 1
        if st.turn_done:
            out.append(n)
            n = 0
    assert n == 0, "the episode ended inside a turn"
    return out


# -- ActionSpace ----------------------------------------------------------------------------------
def test_action_space_shape_and_dtype() -> None:
    assert ActionSpace(discrete=True, n=3).shape == (1,)
    assert ActionSpace(discrete=True, n=3).dtype == "int64"
    box = ActionSpace(discrete=False, dim=4, low=-2.0, high=2.0)
    assert box.shape == (4,) and box.dtype == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        box.dim = 5  # type: ignore[misc]


# -- GymTurnEnv -----------------------------------------------------------------------------------
@pytest.mark.parametrize("turn_steps", [25, 4])
def test_cartpole_pole_falls_early_under_a_fixed_action(turn_steps: int) -> None:
    env = GymTurnEnv("CartPole-v1", turn_steps=turn_steps, max_steps=200)
    assert env.observation_shape == (4,)
    assert env.action_space == ActionSpace(discrete=True, n=2)
    for seed in range(5):
        steps = run(env, seed, lambda t: 0)
        n = len(steps)
        assert n < 50  # always pushing left: the pole falls within a few dozen steps
        lengths = turn_lengths(steps)
        assert len(lengths) == math.ceil(n / turn_steps) == sum(st.turn_done for st in steps)
        assert lengths[:-1] == [turn_steps] * (len(lengths) - 1)
        assert lengths[-1] == n - turn_steps * (len(lengths) - 1) and 1 <= lengths[-1] <= turn_steps
        if n % turn_steps:
            assert lengths[-1] < turn_steps
        for st in steps:
            assert st.reward == {"env": pytest.approx(0.04 * 1.0)}
            assert st.observation.shape == (4,) and st.observation.dtype == np.float32
        last = steps[-1]
        assert [st.done for st in steps] == [False] * (n - 1) + [True]
        assert all(st.outcome is None for st in steps[:-1])
        assert set(last.outcome) == {"return", "success"}
        assert last.outcome["success"] == 0.0
        assert last.outcome["return"] == pytest.approx(0.005 * n)
        assert last.truncated is False
        assert last.info == {"success": 0.0, "episode_steps": float(n), "env_return": float(n)}


def test_cartpole_surviving_to_max_steps_is_truncated_and_a_success() -> None:
    env = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=10)
    seed = 0
    steps = run(env, seed, lambda t: t % 2)
    assert len(steps) == 10, "alternating actions should keep the pole up for 10 steps on seed 0"
    assert turn_lengths(steps) == [5, 5]
    last = steps[-1]
    assert last.done and last.turn_done and last.truncated
    assert last.outcome == {"return": pytest.approx(0.05), "success": 1.0}
    assert last.info["success"] == 1.0
    assert not any(st.truncated for st in steps[:-1])


def test_gym_outcome_and_turn_scales_are_settings() -> None:
    env = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=10, turn_reward_scale=1.0, outcome_scale=0.1,
                     success_weight=2.0)
    steps = run(env, 0, lambda t: t % 2)
    assert steps[0].reward == {"env": 1.0}
    assert steps[-1].outcome == {"return": pytest.approx(1.0), "success": 2.0}
    assert steps[-1].info["success"] == 1.0  # the metric stays 0/1


def test_gym_reset_is_deterministic_in_the_seed() -> None:
    a = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=50)
    b = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=50)
    np.testing.assert_array_equal(a.reset(3), b.reset(3))
    assert not np.array_equal(a.reset(3), a.reset(4))
    ea = [st.observation.tolist() for st in run(a, 3, lambda t: t % 2)]
    eb = [st.observation.tolist() for st in run(b, 3, lambda t: t % 2)]
    assert ea == eb
    # a second episode in the same env starts from scratch (step counter and return reset)
    again = run(a, 3, lambda t: t % 2)
    assert [st.observation.tolist() for st in again] == ea
    assert again[-1].info["episode_steps"] == len(again)


def test_gym_discrete_out_of_range_action_is_clipped() -> None:
    a = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=20)
    b = GymTurnEnv("CartPole-v1", turn_steps=5, max_steps=20)
    a.reset(1)
    b.reset(1)
    for wild, clipped in [(7, 1), (-3, 0), (99, 1)]:
        sa, sb = a.step(np.array([wild])), b.step(np.array([clipped]))
        np.testing.assert_array_equal(sa.observation, sb.observation)


def test_box_action_env_pendulum() -> None:
    env = GymTurnEnv("Pendulum-v1", turn_steps=5, max_steps=10)
    space = env.action_space
    assert space.discrete is False and space.dim == 1
    assert (space.low, space.high) == (-2.0, 2.0)
    assert space.shape == (1,) and space.dtype == "float32"
    assert env.observation_shape == (3,)
    ref = GymTurnEnv("Pendulum-v1", turn_steps=5, max_steps=10)
    env.reset(0)
    ref.reset(0)
    for wild, clipped in [(1e6, 2.0), (-1e6, -2.0), (50.0, 2.0)]:
        st = env.step(np.array([wild], dtype=np.float32))
        want = ref.step(np.array([clipped], dtype=np.float32))
        np.testing.assert_allclose(st.observation, want.observation, rtol=1e-6)
        assert st.reward["env"] == pytest.approx(want.reward["env"])
        assert np.isfinite(st.observation).all()
    steps = run(env, 0, lambda t: 0.0)
    assert len(steps) == 10 and turn_lengths(steps) == [5, 5]
    assert steps[-1].truncated and steps[-1].outcome["success"] == 1.0  # Pendulum never terminates


def test_make_tensor_env_unknown_kind_names_the_kinds() -> None:
    with pytest.raises(ValueError) as e:
        make_tensor_env("nope")
    msg = str(e.value)
    assert "nope" in msg and "arm" in msg and "gym" in msg


def test_make_tensor_env_gym_passes_settings() -> None:
    env = make_tensor_env("gym", env_id="CartPole-v1", turn_steps=3, max_steps=9)
    assert isinstance(env, GymTurnEnv) and (env.turn_steps, env.max_steps) == (3, 9)


@pytest.mark.parametrize("turn_steps,max_steps", [(11, 10), (0, 10), (-1, 5)])
def test_gym_turn_env_rejects_bad_turn_settings(turn_steps: int, max_steps: int) -> None:
    with pytest.raises(ValueError, match="turn_steps"):
        GymTurnEnv("CartPole-v1", turn_steps=turn_steps, max_steps=max_steps)


# -- TensorEnvWorker --------------------------------------------------------------------------------
class FlakyEnv:
    """A tiny tensor env: obs = [seed, steps taken]; ends after ``length`` steps; raises in ``step`` on call
    ``fail_at`` (1-based, counted from reset) of an episode reset with seed ``fail_seed``."""

    observation_shape = (2,)
    action_space = ActionSpace(discrete=True, n=2)

    def __init__(self, length: int = 3, fail_seed: int = -1, fail_at: int = 1):
        self.length, self.fail_seed, self.fail_at = length, fail_seed, fail_at

    def reset(self, seed: int) -> np.ndarray:
        self.seed, self.t = int(seed), 0
        return np.array([self.seed, 0], dtype=np.float32)

    def step(self, action: np.ndarray) -> TensorStep:
        self.t += 1
        if self.seed == self.fail_seed and self.t == self.fail_at:
            raise ZeroDivisionError("a broken env")
        done = self.t >= self.length
        return TensorStep(np.array([self.seed, self.t], dtype=np.float32), {"r": float(np.asarray(action).item())},
                          done, done, {"o": 1.0} if done else None, info={"len": float(self.t)} if done else {})


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(TENSOR_ENVS, "flaky", FlakyEnv)
    return "flaky"


def test_worker_spec_of_the_arm() -> None:
    w = TensorEnvWorker("arm", {"grasp_steps": 3})
    spec = w.spec()
    assert spec["observation_shape"] == (12,)
    assert spec["action_space"] == ArmThrowEnv.action_space
    assert w.ping() is True
    assert w.stats() == {"errors": 0.0, "live_episodes": 0.0}


def test_worker_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="nope"):
        TensorEnvWorker("nope", {})


def test_worker_reset_and_step_a_subset_match_separate_envs() -> None:
    w = TensorEnvWorker("arm", {})
    slots, seeds = [4, 0, 7], [101, 102, 103]
    obs = w.reset(slots, seeds)
    assert obs.shape == (3, 12) and obs.dtype == np.float32
    refs = {s: ArmThrowEnv() for s in slots}
    for i, (s, seed) in enumerate(zip(slots, seeds)):
        np.testing.assert_array_equal(obs[i], refs[s].reset(seed))
    assert w.stats()["live_episodes"] == 3
    # step slots 7 and 4 (in that order), not 0
    out = w.step([7, 4], np.array([[5], [1]]))
    assert out["observation"].shape == (2, 12)
    for k in ("turn_done", "done", "truncated"):
        assert out[k].dtype == bool and out[k].shape == (2,)
    assert len(out["reward"]) == len(out["outcome"]) == len(out["info"]) == 2
    for i, (s, a) in enumerate([(7, 5), (4, 1)]):
        want = refs[s].step(np.array([a]))
        np.testing.assert_array_equal(out["observation"][i], want.observation)
        assert out["reward"][i] == want.reward
        assert out["turn_done"][i] == want.turn_done and out["done"][i] == want.done
        assert out["outcome"][i] is None
    # slot 0 was not stepped: its next step continues from its reset
    out0 = w.step([0], np.array([[3]]))
    np.testing.assert_array_equal(out0["observation"][0], refs[0].step(np.array([3])).observation)


def test_worker_releases_finished_slots(flaky: str) -> None:
    w = TensorEnvWorker(flaky, {"length": 2})
    w.reset([0, 1, 2], [10, 11, 12])
    assert w.stats()["live_episodes"] == 3
    out = w.step([0, 1, 2], np.array([[1], [0], [1]]))
    assert not out["done"].any() and w.stats()["live_episodes"] == 3
    np.testing.assert_array_equal(out["observation"], [[10, 1], [11, 1], [12, 1]])
    assert out["reward"] == [{"r": 1.0}, {"r": 0.0}, {"r": 1.0}]
    out = w.step([2, 0], np.array([[0], [0]]))  # these two end
    assert out["done"].tolist() == [True, True] and out["turn_done"].tolist() == [True, True]
    assert out["outcome"] == [{"o": 1.0}, {"o": 1.0}]
    assert out["info"] == [{"len": 2.0}, {"len": 2.0}]
    assert w.stats()["live_episodes"] == 1
    # a released slot can start a new episode; reusing an env resets it
    obs = w.reset([2], [20])
    np.testing.assert_array_equal(obs, [[20, 0]])
    assert w.stats()["live_episodes"] == 2
    out = w.step([1, 2], np.array([[1], [1]]))
    np.testing.assert_array_equal(out["observation"], [[11, 2], [20, 1]])
    assert out["done"].tolist() == [True, False]
    assert w.stats() == {"errors": 0.0, "live_episodes": 1.0}


def test_worker_reset_of_a_live_slot_restarts_it(flaky: str) -> None:
    w = TensorEnvWorker(flaky, {"length": 5})
    w.reset([3], [1])
    w.step([3], np.array([[0]]))
    w.reset([3], [2])
    assert w.stats()["live_episodes"] == 1
    out = w.step([3], np.array([[0]]))
    np.testing.assert_array_equal(out["observation"], [[2, 1]])


def test_worker_env_error_ends_only_that_slot(flaky: str) -> None:
    w = TensorEnvWorker(flaky, {"length": 4, "fail_seed": 66, "fail_at": 2})
    w.reset([0, 1, 2], [5, 66, 7])
    out = w.step([0, 1, 2], np.array([[1], [1], [1]]))  # call 1: fine everywhere
    assert not out["done"].any() and w.stats()["errors"] == 0
    out = w.step([0, 1, 2], np.array([[1], [1], [1]]))  # call 2: slot 1's env raises
    assert out["done"].tolist() == [False, True, False]
    assert out["turn_done"].tolist() == [False, True, False]
    assert out["truncated"].tolist() == [False, False, False]
    assert out["outcome"] == [None, {}, None]
    assert out["info"] == [{}, {"env_error": 1.0}, {}]
    assert out["reward"][1] == {}
    np.testing.assert_array_equal(out["observation"][1], [0, 0])
    np.testing.assert_array_equal(out["observation"][[0, 2]], [[5, 2], [7, 2]])
    assert w.stats() == {"errors": 1.0, "live_episodes": 2.0}
    # the others carry on to their normal end
    out = w.step([0, 2], np.array([[0], [0]]))
    out = w.step([0, 2], np.array([[0], [0]]))
    assert out["done"].tolist() == [True, True]
    assert out["outcome"] == [{"o": 1.0}, {"o": 1.0}] and out["info"] == [{"len": 4.0}, {"len": 4.0}]
    assert w.stats() == {"errors": 1.0, "live_episodes": 0.0}
    # the failed slot can start a new episode, which runs normally
    np.testing.assert_array_equal(w.reset([1], [8]), [[8, 0]])
    out = w.step([1], np.array([[1]]))
    assert out["info"] == [{}] and out["done"].tolist() == [False]
    np.testing.assert_array_equal(out["observation"], [[8, 1]])
    assert w.stats() == {"errors": 1.0, "live_episodes": 1.0}


def test_worker_step_of_a_slot_never_reset_is_an_env_error(flaky: str) -> None:
    w = TensorEnvWorker(flaky, {"length": 3})
    w.reset([0], [1])
    out = w.step([9, 0], np.array([[1], [1]]))
    assert out["done"].tolist() == [True, False]
    assert out["outcome"][0] == {} and out["info"][0] == {"env_error": 1.0}
    np.testing.assert_array_equal(out["observation"], [[0, 0], [1, 1]])
    assert w.stats() == {"errors": 1.0, "live_episodes": 1.0}
    # the slot that finished (or never ran) stays unknown: stepping it again is another error
    out = w.step([9], np.array([[1]]))
    assert out["info"] == [{"env_error": 1.0}] and w.stats()["errors"] == 2.0


def test_worker_step_after_the_episode_ended_is_an_env_error() -> None:
    env = ArmThrowEnv(max_grasps=1)
    env.reset(0)
    assert abs(env.x_b - 0.5) > env.grasp_tol  # seed 0: closing at the start misses the ball
    w = TensorEnvWorker("arm", {"max_grasps": 1})
    w.reset([0], [0])
    out = w.step([0], np.array([[6]]))  # the single attempt fails: the episode ends
    assert out["done"].tolist() == [True] and out["outcome"] == [{"basket": 0.0}]
    assert w.stats() == {"errors": 0.0, "live_episodes": 0.0}
    out = w.step([0], np.array([[6]]))
    assert out["info"] == [{"env_error": 1.0}] and w.stats()["errors"] == 1.0


def test_worker_runs_gym_envs() -> None:
    w = TensorEnvWorker("gym", {"env_id": "CartPole-v1", "turn_steps": 5, "max_steps": 10})
    assert w.spec()["observation_shape"] == (4,)
    obs = w.reset([0, 1], [0, 0])
    np.testing.assert_array_equal(obs[0], obs[1])  # same seed, same start
    for t in range(10):
        out = w.step([0, 1], np.array([[t % 2], [t % 2]]))
        assert out["turn_done"].tolist() == [t % 5 == 4] * 2
    assert out["done"].all() and out["truncated"].all()
    assert out["outcome"][0] == {"return": pytest.approx(0.05), "success": 1.0}
    assert w.stats() == {"errors": 0.0, "live_episodes": 0.0}
