"""The rollout worker (actors/rollout.py) against a real env worker: how an episode ends.

An episode can run out of two budgets: ``env.max_turns`` (the env ends it) and
``generation.max_tokens_per_episode`` (the rollout worker sees it first). Both end through the env,
so the outcome is scored the same way (format terms included) and ``truncated`` says which ran out.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from actors.engine import SamplingParams
from actors.generator import Generator
from actors.rollout import RolloutWorker
from common import schema as S
from common.modeling import load_tokenizer
from env_workers.demo_data import generate_demo_data, load_questions
from env_workers.index import BM25Index
from env_workers.worker import EnvWorker
from tests.actors.fakes import ListQueue, LocalHandle


@pytest.fixture(scope="module")
def small_env(tmp_path_factory) -> tuple[Path, list[dict]]:
    paths = generate_demo_data(tmp_path_factory.mktemp("demo"), seed=0, num_people=40, num_cities=8,
                               num_countries=3)
    index_dir = BM25Index.build(paths["corpus"]).save(tmp_path_factory.mktemp("index"))
    return index_dir, load_questions(paths["eval"], limit=1)


def _rollout(policy: Path, index_dir: Path, question: dict, *, max_turns: int, budget: int, per_turn: int,
             streaming: bool):
    env = EnvWorker(str(index_dir), {"max_turns": max_turns})
    queue = ListQueue()
    worker = RolloutWorker(str(policy), [LocalHandle(Generator(str(policy), torch_threads=1))], [LocalHandle(env)],
                           LocalHandle(queue), run_id="t", max_tokens_per_turn=per_turn, max_tokens_per_episode=budget,
                           streaming=streaming)
    worker.run([question], group_size=2, first_group_id=0, first_episode_id=0,
               params=SamplingParams(max_new_tokens=8, seed=3, stop=["</tool>"]))
    return pa.Table.from_batches(queue.batches).to_pylist(), env


@pytest.mark.parametrize("streaming", [False, True], ids=["turn-sync", "streaming"])
def test_the_token_budget_ends_the_episode_through_the_env(ray_local, tiny_policy, small_env, streaming):
    index_dir, [question] = small_env
    tok = load_tokenizer(str(tiny_policy))
    prompt = tok.apply_chat_template(EnvWorker(str(index_dir)).reset(["x"], [question])[0], tokenize=False,
                                     add_generation_prompt=True)
    context = len(tok.encode(prompt, add_special_tokens=False))
    rows, env = _rollout(tiny_policy, index_dir, question, max_turns=4, budget=context + 3, per_turn=8,
                         streaming=streaming)
    assert len(rows) == 2 and all(r[S.TURN_INDEX] == 0 and r[S.IS_LAST_TURN] for r in rows)  # one turn each
    assert env.num_live() == 0  # the env ended them (and forgot them), not only the rollout worker
    for r in rows:
        assert len(r[S.ACTION_TOKEN_IDS]) <= 3
        # scored by the env as any ending is: every outcome term present (the format terms included)
        assert set(dict(r[S.OUTCOME_REWARD_COMPONENTS])) == {"exact_match", "answer_contains", "f1", "format", "xml"}
        assert r[S.OUTCOME_REWARD] == pytest.approx(sum(dict(r[S.OUTCOME_REWARD_COMPONENTS]).values()))
        assert r[S.TRUNCATED] == (len(r[S.ACTION_TOKEN_IDS]) == 3)  # cut mid-action by the budget
    # the same actions ended by max_turns instead (a 3-token turn cap, a roomy episode budget) score identically
    by_turns, _ = _rollout(tiny_policy, index_dir, question, max_turns=1, budget=context + 100, per_turn=3,
                           streaming=streaming)
    assert [r[S.OUTCOME_REWARD_COMPONENTS] for r in by_turns] == [r[S.OUTCOME_REWARD_COMPONENTS] for r in rows]
    assert [r[S.ACTION_TOKEN_IDS] for r in by_turns] == [r[S.ACTION_TOKEN_IDS] for r in rows]
