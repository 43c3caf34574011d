"""Tree rollouts (rollout.tree) through real Ray actors: generator, env worker, Arrow replay queue.

The shipped warm-start policy searches on its first turn, so its episodes reach the branch turn (1)
and fork there: a leaf shares its root's first turn (one node id in both leaves' rows) and draws its
own second turn. The queue releases a tree only when all its leaves are complete, and the learner's
batch trains the shared turn once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from actors.engine import SamplingParams
from actors.generator import Generator
from actors.rollout import RolloutWorker
from common import schema as S
from common.replay_queue import ReplayQueue
from env_workers.demo_data import generate_demo_data, load_questions
from env_workers.index import BM25Index
from env_workers.worker import EnvWorker
from learner.batch import assemble
from tests.actors.fakes import ListQueue, LocalHandle

REPO = Path(__file__).resolve().parents[2]
WARM = REPO / "deploy" / "warmstart"
G, CHILDREN, QUESTIONS = 4, 2, 3
ENV = {"max_turns": 2, "system_prompt": "Use the wiki_search tool in <tool> tags to search Wikipedia, then answer in "
       "<answer> tags."}  # deploy/configs/local.yaml's, which the warm start was trained with


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[dict]]:
    paths = generate_demo_data(tmp_path_factory.mktemp("demo"), seed=0, num_people=40, num_cities=8,
                               num_countries=3)
    index_dir = BM25Index.build(paths["corpus"]).save(tmp_path_factory.mktemp("index"))
    return index_dir, load_questions(paths["eval"], limit=QUESTIONS)


@pytest.mark.parametrize("streaming", [False, True], ids=["turn-sync", "streaming"])
def test_tree_leaves_share_the_prefix_and_the_tree_is_released_whole(ray_local, demo, streaming):
    ray = ray_local
    index_dir, questions = demo
    gen = ray.remote(Generator).options(num_cpus=0).remote(str(WARM), torch_threads=1)
    env = ray.remote(EnvWorker).options(num_cpus=0).remote(str(index_dir), ENV)
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(max_policy_lag=4)
    worker = ray.remote(RolloutWorker).options(num_cpus=0).remote(
        str(WARM), [gen], [env], queue, run_id="tree", max_tokens_per_turn=48, max_tokens_per_episode=400,
        streaming=streaming, tree_branch_turns=(1,), tree_children=CHILDREN)
    params = SamplingParams(temperature=1.0, max_new_tokens=48, seed=11, stop=["</tool>", "</answer>"])
    res = ray.get(worker.run.remote(questions, group_size=G, first_group_id=0, first_episode_id=0, params=params))
    assert len(res["episodes"]) == QUESTIONS * G  # the leaves
    assert res["forked_episodes"] > 0  # some roots searched and reached the branch turn
    assert ray.get(gen.stats.remote())["forked_sessions"] == res["forked_episodes"]
    table = ray.get(queue.get.remote(QUESTIONS, 0, timeout=5.0))
    assert table is not None and len(set(table.column(S.GROUP_ID).to_pylist())) == QUESTIONS
    rows = table.to_pylist()
    assert ray.get(env.num_live.remote()) == 0

    by_group: dict[int, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r[S.GROUP_ID], []).append(r)
    forked_leaves = 0
    for group in by_group.values():
        leaves = {r[S.EPISODE_ID] for r in group}
        assert len(leaves) == G
        first = {r[S.EPISODE_ID]: r for r in group if r[S.TURN_INDEX] == 0}
        roots = {r[S.NODE_ID] for r in first.values()}
        assert len(roots) == G // CHILDREN  # each root's first turn is shared by its children
        for r in first.values():
            assert r[S.PARENT_NODE_ID] == -1
        for node in roots:
            copies = [r for r in first.values() if r[S.NODE_ID] == node]
            assert len(copies) == CHILDREN
            # one turn, copied: identical tokens, log-probs and rewards in every leaf
            assert len({(tuple(r[S.ACTION_TOKEN_IDS]), tuple(r[S.ACTION_LOGPROBS]), r[S.TURN_REWARD])
                        for r in copies}) == 1
        second = [r for r in group if r[S.TURN_INDEX] == 1]
        for r in second:  # a leaf's own turn, whose parent is its root's shared first turn
            assert r[S.PARENT_NODE_ID] == first[r[S.EPISODE_ID]][S.NODE_ID]
            assert r[S.NODE_ID] == S.node_id(r[S.EPISODE_ID], 1)
        assert len({r[S.NODE_ID] for r in second}) == len(second)
        forked_leaves += len(second)
    assert forked_leaves > 0

    batch = assemble(table, pad_id=0)  # the learner's view: a shared turn carries loss in one leaf only
    trained_first_turn_tokens = sum(len(r[S.ACTION_TOKEN_IDS]) for r in rows if r[S.TURN_INDEX] == 0
                                    and r[S.EPISODE_ID] % CHILDREN == 0)
    first_turn = (batch.token_turn == 0) & (batch.action_mask > 0)
    assert int(first_turn.sum()) == trained_first_turn_tokens
    every_turn_once = {r[S.NODE_ID]: len(r[S.ACTION_TOKEN_IDS]) for r in rows}
    assert int(batch.action_mask.sum()) == sum(every_turn_once.values())
    for handle in (worker, gen, env, queue):
        ray.kill(handle)


def test_a_tree_waits_for_its_last_leaf_in_the_queue(ray_local, demo):
    """The queue knows a tree as a group of G leaves: rows of all leaves but one release nothing."""
    ray = ray_local
    index_dir, questions = demo
    gen = Generator(str(WARM), torch_threads=1)
    env = EnvWorker(str(index_dir), ENV)
    sink = ListQueue()
    worker = RolloutWorker(str(WARM), [LocalHandle(gen)], [LocalHandle(env)], LocalHandle(sink), run_id="tree",
                           max_tokens_per_turn=48, max_tokens_per_episode=400, tree_branch_turns=(1,),
                           tree_children=CHILDREN)
    params = SamplingParams(temperature=1.0, max_new_tokens=48, seed=5, stop=["</tool>", "</answer>"])
    worker.run(questions[:1], group_size=G, first_group_id=7, first_episode_id=100, params=params)
    rows = pa.Table.from_batches(sink.batches)
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(max_policy_lag=4)
    last_leaf = max(rows.column(S.EPISODE_ID).to_pylist())
    keep = pa.compute.not_equal(rows.column(S.EPISODE_ID), last_leaf)
    ray.get(queue.put.remote(rows.filter(keep)))
    assert ray.get(queue.get.remote(1, 0)) is None  # G - 1 leaves: the tree is not complete
    ray.get(queue.put.remote(rows.filter(pa.compute.invert(keep))))
    out = ray.get(queue.get.remote(1, 0))
    assert out is not None and out.num_rows == rows.num_rows
    ray.kill(queue)
