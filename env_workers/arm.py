"""The seed's example as a task: a 2-D arm that picks up a ball, aims, and throws it through a hoop.

No physics engine: the gripper slides on a rail at height ``RELEASE_HEIGHT`` above the ground, the ball
rests on the rail at ``x_b``, and a thrown ball flies a ballistic arc (``g = 9.81``) from ``(x_b, 0.3)``. A
hoop of radius ``hoop_radius`` hangs at ``(x_h, y_h)``. Everything is drawn from the reset seed:
``x_b ~ U[0, 1]``, the hoop on a random side at horizontal distance ``U[0.6, 1.2]`` and height
``U[0.5, 0.9]``; the gripper starts at x = 0.5.

Three sub-goals, one turn each (``Discrete(8)`` actions whose meaning depends on the phase):

=========  ==============================================  =========================================
turn       actions                                           turn reward
=========  ==============================================  =========================================
grasp      0-5 slide by -0.2, -0.1, -0.03, +0.03, +0.1, +0.2; ``grasp`` (weight ``grasp_reward``) if
           6-7 close. Several steps, at most ``grasp_steps``  the gripper closed within ``grasp_tol``
           (then the attempt fails)                            of the ball
aim        a < 4 throws left, else right; elevation           ``aim`` (``aim_reward``) if it faces the
           35, 45, 55, 65 degrees for a % 4; one step          hoop
throw      speed 2.5 + 0.25 a m/s; one step                  none: the outcome ``basket``
                                                               (``basket_reward``) if the ball passes
                                                               down through the hoop
=========  ==============================================  =========================================

Each step reports its turn's kind (``turn_kind``: 0 grasp, 1 aim, 2 throw), so a second grasp attempt is
recognisably a grasp whatever its turn index. A failed grasp attempt is followed by another one, up to ``max_grasps``; when the last fails the episode
ends with outcome 0. Episodes therefore have 2 to ``max_grasps + 2`` turns, and the grasp turns 1 to
``grasp_steps`` steps. About 99 % of episodes can score with some (direction, elevation, speed); a
policy that grasps and aims at random scores about 6 % of its throws.

Observation float32[12]: gripper x; ball x - gripper x (0 once held); hoop x - gripper x; hoop height;
holding; phase one-hot (grasp, aim, throw); grasp steps left / ``grasp_steps``; grasp attempts left /
``max_grasps``; the chosen throw direction (-1, 0, +1); the chosen elevation / 90 degrees (0 before aim).
"""

from __future__ import annotations

import math

import numpy as np

from common.spaces import ActionSpace, TensorStep

RELEASE_HEIGHT = 0.3  # m: the rail and the release point
GRAVITY = 9.81
MOVES = (-0.2, -0.1, -0.03, 0.03, 0.1, 0.2)  # grasp-phase slides, actions 0-5; 6 and 7 close the gripper
ELEVATIONS = (35.0, 45.0, 55.0, 65.0)  # degrees, aim actions a % 4
SPEED_MIN, SPEED_STEP = 2.5, 0.25  # m/s: throw action a -> SPEED_MIN + SPEED_STEP * a
NUM_ACTIONS = 8
GRASP, AIM, THROW = 0, 1, 2


def landing_x(x0: float, direction: int, elevation_deg: float, speed: float, height: float) -> float | None:
    """Where a ball thrown from ``(x0, RELEASE_HEIGHT)`` crosses ``height`` on its way down (None: never)."""
    th = math.radians(elevation_deg)
    vy = speed * math.sin(th)
    disc = vy * vy - 2 * GRAVITY * (height - RELEASE_HEIGHT)
    if disc < 0:
        return None
    t = (vy + math.sqrt(disc)) / GRAVITY
    return x0 + direction * speed * math.cos(th) * t


class ArmThrowEnv:
    """Pick up, aim, throw (module docstring). Deterministic in the reset seed and the actions."""

    observation_shape = (12,)
    action_space = ActionSpace(discrete=True, n=NUM_ACTIONS)

    def __init__(self, *, grasp_steps: int = 6, max_grasps: int = 2, grasp_tol: float = 0.06,
                 hoop_radius: float = 0.15, grasp_reward: float = 1.0, aim_reward: float = 0.5,
                 basket_reward: float = 1.0):
        if grasp_steps < 1 or max_grasps < 1:
            raise ValueError(f"grasp_steps={grasp_steps}, max_grasps={max_grasps}: both must be >= 1")
        if not (grasp_tol > 0 and hoop_radius > 0):
            raise ValueError(f"grasp_tol={grasp_tol}, hoop_radius={hoop_radius}: both must be > 0")
        self.grasp_steps, self.max_grasps, self.grasp_tol, self.hoop_radius = (grasp_steps, max_grasps, grasp_tol,
                                                                               hoop_radius)
        self.grasp_reward, self.aim_reward, self.basket_reward = grasp_reward, aim_reward, basket_reward
        self._started = False

    # -- episode ---------------------------------------------------------------------------
    def reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(int(seed) & 0xFFFF_FFFF_FFFF)
        self.x_b = float(rng.uniform(0.0, 1.0))
        side = 1 if rng.random() < 0.5 else -1
        self.x_h = self.x_b + side * float(rng.uniform(0.6, 1.2))
        self.y_h = float(rng.uniform(0.5, 0.9))
        self.x_g, self.holding, self.phase = 0.5, False, GRASP
        self.steps_left, self.grasps_left = self.grasp_steps, self.max_grasps
        self.direction, self.elevation = 0, 0.0
        self.grasp_attempts, self.aimed = 0, False
        self._started = True
        return self._obs()

    def _obs(self) -> np.ndarray:
        phase = [0.0, 0.0, 0.0]
        phase[self.phase] = 1.0
        return np.array([self.x_g, 0.0 if self.holding else self.x_b - self.x_g, self.x_h - self.x_g, self.y_h,
                         float(self.holding), *phase, self.steps_left / self.grasp_steps,
                         self.grasps_left / self.max_grasps, float(self.direction), self.elevation / 90.0],
                        dtype=np.float32)

    def _end(self, basket: bool, miss: float) -> dict[str, float]:
        return {"success": float(basket), "grasped": float(self.holding), "aimed": float(self.aimed),
                "grasp_attempts": float(self.grasp_attempts), "miss_distance": miss}

    def step(self, action: np.ndarray) -> TensorStep:
        if not self._started:
            raise RuntimeError("ArmThrowEnv.step before reset")
        a = int(np.clip(int(np.asarray(action).reshape(-1)[0]), 0, NUM_ACTIONS - 1))  # out of range: clipped
        if self.phase == GRASP:
            return self._grasp_step(a)
        if self.phase == AIM:
            self.direction = -1 if a < 4 else 1
            self.elevation = ELEVATIONS[a % 4]
            self.aimed = self.direction == (1 if self.x_h > self.x_b else -1)
            self.phase = THROW
            return TensorStep(self._obs(), {"aim": self.aim_reward * float(self.aimed)}, True, False, turn_kind=AIM)
        speed = SPEED_MIN + SPEED_STEP * a
        x = landing_x(self.x_b, self.direction, self.elevation, speed, self.y_h)
        miss = abs(x - self.x_h) if x is not None else abs(self.x_h - self.x_b)
        basket = x is not None and miss < self.hoop_radius
        self._started = False
        return TensorStep(self._obs(), {}, True, True, {"basket": self.basket_reward * float(basket)},
                          info=self._end(basket, miss), turn_kind=THROW)

    def _grasp_step(self, a: int) -> TensorStep:
        self.steps_left -= 1
        closed = a >= len(MOVES)
        if not closed:
            self.x_g = float(np.clip(self.x_g + MOVES[a], 0.0, 1.0))
            if self.steps_left > 0:
                return TensorStep(self._obs(), {"grasp": 0.0}, False, False)
        self.grasp_attempts += 1
        got = closed and abs(self.x_g - self.x_b) < self.grasp_tol
        self.steps_left = self.grasp_steps
        if got:
            self.holding, self.phase = True, AIM
            return TensorStep(self._obs(), {"grasp": self.grasp_reward}, True, False)
        self.grasps_left -= 1
        if self.grasps_left > 0:  # another attempt: a new turn
            return TensorStep(self._obs(), {"grasp": 0.0}, True, False)
        self._started = False
        return TensorStep(self._obs(), {"grasp": 0.0}, True, True, {"basket": 0.0},
                          info=self._end(False, abs(self.x_h - self.x_b)))
