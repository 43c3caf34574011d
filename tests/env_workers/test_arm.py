"""The pick-aim-throw arm task (env_workers.arm): determinism, turn structure, rewards, clipping, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from env_workers.arm import (
    ELEVATIONS,
    GRAVITY,
    MOVES,
    NUM_ACTIONS,
    RELEASE_HEIGHT,
    SPEED_MIN,
    SPEED_STEP,
    ArmThrowEnv,
    landing_x,
)
from env_workers.tensor_env import TensorStep, make_tensor_env

CLOSE = 6  # actions 6 and 7 close the gripper in the grasp phase


# -- helpers --------------------------------------------------------------------------------------
def run_episode(env: ArmThrowEnv, seed: int, policy, max_steps: int = 200) -> tuple[list[TensorStep], list[int]]:
    """Steps of one episode under ``policy(env, obs) -> action`` and the actions taken."""
    obs = env.reset(seed)
    steps, actions = [], []
    for _ in range(max_steps):
        a = policy(env, obs)
        st = env.step(np.array([a]))
        steps.append(st)
        actions.append(a)
        obs = st.observation
        if st.done:
            return steps, actions
    raise AssertionError(f"episode of seed {seed} did not end within {max_steps} steps")


def turns_of(steps: list[TensorStep]) -> list[list[TensorStep]]:
    """The steps grouped into turns (a turn ends at a step with turn_done)."""
    out, cur = [], []
    for st in steps:
        cur.append(st)
        if st.turn_done:
            out.append(cur)
            cur = []
    assert not cur, "the episode ended inside a turn"
    return out


def turn_rewards(steps: list[TensorStep]) -> list[dict[str, float]]:
    """Each turn's reward: its steps' components summed."""
    out = []
    for turn in turns_of(steps):
        total: dict[str, float] = {}
        for st in turn:
            for k, v in st.reward.items():
                total[k] = total.get(k, 0.0) + v
        out.append(total)
    return out


def best_throw(x_b: float, x_h: float, y_h: float, hoop_radius: float) -> tuple[int, int] | None:
    """(aim action, throw action) that puts the ball through the hoop, by brute force; None if none does."""
    direction = 1 if x_h > x_b else -1
    best = None
    for e_i, elev in enumerate(ELEVATIONS):
        for s in range(NUM_ACTIONS):
            x = landing_x(x_b, direction, elev, SPEED_MIN + SPEED_STEP * s, y_h)
            if x is not None and abs(x - x_h) < hoop_radius and (best is None or abs(x - x_h) < best[0]):
                best = (abs(x - x_h), e_i, s)
    if best is None:
        return None
    return (4 if direction > 0 else 0) + best[1], best[2]


def expert(env: ArmThrowEnv, obs: np.ndarray) -> int:
    """Grasp from the observation (obs[1] = ball x - gripper x), then aim and throw by brute force."""
    if obs[5] == 1.0:  # grasp phase
        gap = float(obs[1])
        if abs(gap) < env.grasp_tol:
            return CLOSE
        return int(np.argmin([abs(gap - m) for m in MOVES]))
    plan = best_throw(env.x_b, env.x_h, env.y_h, env.hoop_radius)
    aim, speed = plan if plan is not None else (0, 0)
    return aim if obs[6] == 1.0 else speed


# -- physics --------------------------------------------------------------------------------------
def test_landing_x_matches_the_range_formula_and_mirrors_with_direction() -> None:
    for elev, speed in [(35.0, 2.5), (45.0, 3.0), (65.0, 4.25)]:
        flat = speed ** 2 * math.sin(2 * math.radians(elev)) / GRAVITY  # range at the release height
        assert landing_x(0.2, 1, elev, speed, RELEASE_HEIGHT) == pytest.approx(0.2 + flat, rel=1e-9)
        assert landing_x(0.2, -1, elev, speed, RELEASE_HEIGHT) == pytest.approx(0.2 - flat, rel=1e-9)


def test_landing_x_is_the_descending_crossing_and_none_when_out_of_reach() -> None:
    elev, speed, height = 55.0, 3.5, 0.6
    x = landing_x(0.0, 1, elev, speed, height)
    th = math.radians(elev)
    t = x / (speed * math.cos(th))
    assert RELEASE_HEIGHT + speed * math.sin(th) * t - GRAVITY * t * t / 2 == pytest.approx(height, abs=1e-9)
    assert speed * math.sin(th) - GRAVITY * t < 0  # on the way down
    apex = RELEASE_HEIGHT + (speed * math.sin(th)) ** 2 / (2 * GRAVITY)
    assert landing_x(0.0, 1, elev, speed, apex + 0.01) is None


# -- reset ----------------------------------------------------------------------------------------
def test_reset_is_deterministic_in_the_seed() -> None:
    a, b = ArmThrowEnv(), ArmThrowEnv()
    np.testing.assert_array_equal(a.reset(7), b.reset(7))
    b.reset(8)
    np.testing.assert_array_equal(a.reset(7), b.reset(7))  # an earlier episode leaves no trace
    assert not np.array_equal(a.reset(7), a.reset(8))
    firsts = {tuple(ArmThrowEnv().reset(s).tolist()) for s in range(50)}
    assert len(firsts) == 50


def test_same_seed_and_actions_give_the_same_episode() -> None:
    rng = np.random.default_rng(0)
    actions = rng.integers(0, NUM_ACTIONS, size=40).tolist()

    def replay(seed: int) -> list[tuple]:
        env = ArmThrowEnv()
        env.reset(seed)
        out = []
        for a in actions:
            st = env.step(np.array([a]))
            out.append((st.observation.tolist(), st.reward, st.turn_done, st.done, st.outcome, st.info))
            if st.done:
                break
        return out

    assert replay(3) == replay(3)
    assert replay(3) != replay(4)


def test_reset_draws_stay_in_their_documented_ranges() -> None:
    env = ArmThrowEnv()
    sides = set()
    for seed in range(300):
        obs = env.reset(seed)
        assert obs.shape == (12,) and obs.dtype == np.float32
        assert 0.0 <= env.x_b <= 1.0
        assert 0.6 <= abs(env.x_h - env.x_b) <= 1.2
        assert 0.5 <= env.y_h <= 0.9
        assert env.x_g == 0.5
        sides.add(np.sign(env.x_h - env.x_b))
    assert sides == {-1.0, 1.0}


def test_observation_layout_through_an_episode() -> None:
    env = ArmThrowEnv(grasp_steps=6, max_grasps=2)
    obs = env.reset(11)
    np.testing.assert_allclose(obs[:4], [0.5, env.x_b - 0.5, env.x_h - 0.5, env.y_h], atol=1e-6)
    np.testing.assert_array_equal(obs[4:], [0, 1, 0, 0, 1, 1, 0, 0])
    # one slide: steps left drops by 1/grasp_steps
    a = 5 if env.x_b > 0.5 else 0
    obs = env.step(np.array([a])).observation
    assert obs[0] == pytest.approx(0.5 + MOVES[a])
    assert obs[8] == pytest.approx(5 / 6)
    # walk to the ball and close
    while obs[5] == 1.0:
        obs = env.step(np.array([expert(env, obs)])).observation
    np.testing.assert_allclose(obs[[1, 4, 5, 6, 7]], [0, 1, 0, 1, 0])  # held, aim phase
    assert obs[8] == 1.0  # the grasp budget is refilled
    obs = env.step(np.array([6])).observation  # right, 55 degrees
    np.testing.assert_allclose(obs[[5, 6, 7, 10, 11]], [0, 0, 1, 1, 55 / 90], atol=1e-6)


# -- the expert scores --------------------------------------------------------------------------
def test_expert_policy_scores_on_most_seeds_with_three_rewarded_turns() -> None:
    env = ArmThrowEnv()
    n_seeds, wins = 200, 0
    for seed in range(n_seeds):
        steps, _ = run_episode(env, seed, expert)
        if steps[-1].info["success"] != 1.0:
            continue
        wins += 1
        assert turn_rewards(steps) == [{"grasp": 1.0}, {"aim": 0.5}, {}]
        assert steps[-1].outcome == {"basket": 1.0}
        assert len(turns_of(steps)) == 3
        info = steps[-1].info
        assert info["grasped"] == 1.0 and info["aimed"] == 1.0 and info["grasp_attempts"] == 1.0
        assert info["miss_distance"] < env.hoop_radius
        assert [st.done for st in steps] == [False] * (len(steps) - 1) + [True]
    assert wins >= 0.9 * n_seeds, f"the expert scored on {wins}/{n_seeds} seeds"


def test_reward_weights_scale_the_turn_rewards_and_outcome() -> None:
    env = ArmThrowEnv(grasp_reward=2.0, aim_reward=0.25, basket_reward=3.0)
    for seed in range(20):
        steps, _ = run_episode(env, seed, expert)
        if steps[-1].info["success"] == 1.0:
            assert turn_rewards(steps) == [{"grasp": 2.0}, {"aim": 0.25}, {}]
            assert steps[-1].outcome == {"basket": 3.0}
            return
    pytest.fail("the expert never scored on seeds 0..19")


def test_aiming_away_from_the_hoop_earns_no_aim_reward_and_misses() -> None:
    env = ArmThrowEnv()

    def wrong_way(env: ArmThrowEnv, obs: np.ndarray) -> int:
        if obs[6] == 1.0:  # aim away from the hoop
            return 0 if env.x_h > env.x_b else 4
        return expert(env, obs)

    for seed in range(30):
        steps, _ = run_episode(env, seed, wrong_way)
        assert turn_rewards(steps) == [{"grasp": 1.0}, {"aim": 0.0}, {}]
        assert steps[-1].outcome == {"basket": 0.0}
        assert steps[-1].info["aimed"] == 0.0 and steps[-1].info["success"] == 0.0


# -- failed grasps ------------------------------------------------------------------------------
def far_ball_seeds(env: ArmThrowEnv, n: int) -> list[int]:
    """Seeds whose ball is out of reach of a gripper closing at its start (x = 0.5)."""
    out = []
    for seed in range(1000):
        env.reset(seed)
        if abs(env.x_b - 0.5) >= 2 * env.grasp_tol:
            out.append(seed)
        if len(out) == n:
            return out
    raise AssertionError("not enough seeds with a far ball")


@pytest.mark.parametrize("max_grasps", [2, 3])
def test_closing_at_the_wrong_place_fails_every_attempt(max_grasps: int) -> None:
    env = ArmThrowEnv() if max_grasps == 2 else ArmThrowEnv(max_grasps=3)
    assert env.max_grasps == max_grasps
    for seed in far_ball_seeds(env, 10):
        steps, _ = run_episode(env, seed, lambda e, o: CLOSE)
        turns = turns_of(steps)
        assert len(turns) == max_grasps
        assert all(len(t) == 1 for t in turns)  # closing ends the attempt at once
        assert [st.done for st in steps] == [False] * (max_grasps - 1) + [True]
        assert steps[-1].outcome == {"basket": 0.0}
        assert all(st.outcome is None for st in steps[:-1])
        assert turn_rewards(steps) == [{"grasp": 0.0}] * max_grasps
        info = steps[-1].info
        assert info["success"] == 0.0 and info["grasped"] == 0.0 and info["grasp_attempts"] == max_grasps
        # the attempts left shrink in the observation
        left = [st.observation[9] for st in steps[:-1]]
        np.testing.assert_allclose(left, [(max_grasps - k - 1) / max_grasps for k in range(max_grasps - 1)])


@pytest.mark.parametrize("grasp_steps,max_grasps", [(6, 2), (3, 3), (1, 1)])
def test_never_closing_spends_exactly_grasp_steps_per_attempt(grasp_steps: int, max_grasps: int) -> None:
    env = ArmThrowEnv(grasp_steps=grasp_steps, max_grasps=max_grasps)
    for seed in range(10):
        for move in (0, 3, 5):  # slide left (clips at 0), small right, big right (clips at 1)
            steps, _ = run_episode(env, seed, lambda e, o, move=move: move)
            assert [len(t) for t in turns_of(steps)] == [grasp_steps] * max_grasps
            assert steps[-1].done and steps[-1].outcome == {"basket": 0.0}
            assert steps[-1].info["grasp_attempts"] == max_grasps
            assert all(0.0 <= st.observation[0] <= 1.0 for st in steps)  # the gripper stays on the rail


# -- rules every tensor env keeps -----------------------------------------------------------------
def test_out_of_range_actions_are_clipped_not_raised() -> None:
    for seed in range(5):
        for wild, clipped in [(99, NUM_ACTIONS - 1), (-5, 0), (2**40, NUM_ACTIONS - 1)]:
            a, b = ArmThrowEnv(), ArmThrowEnv()
            a.reset(seed)
            b.reset(seed)
            # grasp (slide or close), then (if held) aim and throw, each with the out-of-range action
            for _ in range(20):
                sa, sb = a.step(np.array([wild])), b.step(np.array([clipped]))
                np.testing.assert_array_equal(sa.observation, sb.observation)
                assert (sa.reward, sa.turn_done, sa.done, sa.outcome, sa.info) == \
                       (sb.reward, sb.turn_done, sb.done, sb.outcome, sb.info)
                if sa.done:
                    break
            assert sa.done


def test_scalar_and_int_actions_are_accepted() -> None:
    env = ArmThrowEnv()
    env.reset(0)
    assert isinstance(env.step(np.int64(3)), TensorStep)
    assert isinstance(env.step(np.array([[2]])), TensorStep)
    assert isinstance(env.step(4), TensorStep)


def test_invariants_under_random_actions() -> None:
    rng = np.random.default_rng(1)
    env = ArmThrowEnv(max_grasps=3, grasp_steps=4)
    for seed in range(200):
        env.reset(seed)
        n_turns = 0
        while True:
            st = env.step(np.array([int(rng.integers(-3, NUM_ACTIONS + 3))]))
            assert st.observation.shape == (12,) and st.observation.dtype == np.float32
            assert (st.outcome is not None) == st.done
            if st.done:
                assert st.turn_done
                assert isinstance(st.outcome, dict) and set(st.outcome) == {"basket"}
                assert set(st.info) == {"success", "grasped", "aimed", "grasp_attempts", "miss_distance"}
            else:
                assert st.info == {}
            n_turns += st.turn_done
            if st.done:
                break
        assert 2 <= n_turns <= 3 + 2


def test_step_before_reset_raises() -> None:
    with pytest.raises(RuntimeError, match="before reset"):
        ArmThrowEnv().step(np.array([0]))


@pytest.mark.parametrize("kwargs", [{"grasp_steps": 0}, {"max_grasps": 0}, {"grasp_steps": -1},
                                    {"grasp_tol": 0.0}, {"grasp_tol": -0.1}, {"hoop_radius": 0.0},
                                    {"hoop_radius": -1.0}])
def test_invalid_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ArmThrowEnv(**kwargs)
    with pytest.raises(ValueError):
        make_tensor_env("arm", **kwargs)


def test_make_tensor_env_builds_the_arm_with_its_settings() -> None:
    env = make_tensor_env("arm", grasp_steps=3, max_grasps=4)
    assert isinstance(env, ArmThrowEnv)
    assert (env.grasp_steps, env.max_grasps) == (3, 4)
    assert env.observation_shape == (12,)
    assert env.action_space.discrete and env.action_space.n == NUM_ACTIONS
    assert env.action_space.shape == (1,) and env.action_space.dtype == "int64"


def test_turn_kinds_name_the_sub_goal_whatever_the_turn_index():
    """A failed first grasp makes the second grasp turn 1; its kind stays 0 (grasp), then aim 1, throw 2."""
    env = ArmThrowEnv()
    env.reset(3)
    env.x_b = 0.8  # the gripper starts at 0.5: a close there fails
    kinds = []
    for action in (6, 5, 4, 6, 4, 0):  # close (fails); slide +0.2, +0.1; close (holds); aim; throw
        st = env.step(np.array([action]))
        if st.turn_done:
            kinds.append(st.turn_kind)
    assert st.done and env.grasp_attempts == 2 and env.holding
    assert kinds == [0, 0, 1, 2]


def test_gym_turn_kinds_are_the_window_index():
    from env_workers.tensor_env import GymTurnEnv

    env = GymTurnEnv("CartPole-v1", turn_steps=3, max_steps=9)
    env.reset(0)
    kinds = [env.step(np.array([t % 2])).turn_kind for t in range(7)]
    assert kinds == [0, 0, 0, 1, 1, 1, 2]
