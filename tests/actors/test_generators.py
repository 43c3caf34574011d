"""Generator actors under Ray: session rollouts, weight pushes (object store and broadcast), crash recovery."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from actors.engine import HFEngine, Request, SamplingParams
from actors.generator import Generator, WeightStore
from actors.pool import GeneratorPool
from actors.rollout import RolloutWorker
from actors.weights import WeightGroup, pack_buckets, plan_buckets, put_buckets
from common import schema as S
from common.modeling import load_model, load_tokenizer
from tests.actors.fakes import ListQueue, LocalHandle, ScriptedEnv

GREEDY = SamplingParams(greedy=True, max_new_tokens=8)


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_policy):
    ray = ray_local
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    gens = [ray.remote(Generator).options(num_cpus=0, max_restarts=2, max_task_retries=0).remote(
        str(tiny_policy), torch_threads=1, weight_store=store) for _ in range(2)]
    env = LocalHandle(ScriptedEnv(3))  # in-process: no extra worker processes
    ray.get([g.ping.remote() for g in gens] + [store.latest.remote()])
    yield {"ray": ray, "store": store, "gens": gens, "env": env, "path": str(tiny_policy)}
    for a in gens + [store]:
        ray.kill(a, no_restart=True)


@pytest.fixture(scope="module")
def local(tiny_policy):
    """A local engine with the same weights, for references."""
    tok = load_tokenizer(tiny_policy)
    eng = HFEngine(load_model(tiny_policy), tok)
    return eng


def _perturbed(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def _push(cluster, version: int, state: dict[str, torch.Tensor]) -> None:
    ray = cluster["ray"]
    refs = put_buckets(state, bucket_bytes=16 * 1024)  # several buckets
    assert len(refs) > 1
    ray.get(cluster["store"].publish.remote(version, refs))
    ray.get([g.update_weights.remote(version, refs) for g in cluster["gens"]])


def _rollout(cluster, seed: int | None = None, streaming: bool = False):
    queue = ListQueue()
    worker = RolloutWorker(cluster["path"], cluster["gens"], [cluster["env"]], LocalHandle(queue), run_id="t",
                           max_tokens_per_turn=8, max_tokens_per_episode=200, streaming=streaming)
    examples = [{"question": q} for q in ("Where is Karo Velmin from?", "Who is Karo?", "Born when?")]
    params = SamplingParams(greedy=seed is None, max_new_tokens=8, seed=seed, stop=["</tool>"])
    res = worker.run(examples, group_size=2, first_group_id=0, first_episode_id=0, params=params)
    rows = sorted(queue.rows(), key=lambda r: (r[S.EPISODE_ID], r[S.TURN_INDEX]))
    return res, rows, worker


def test_rollout_sessions_give_what_re_prefilling_the_history_gives(cluster, local):
    """Each turn of a session rollout (the generator keeps the episode's KV) is what a stateless engine
    re-prefilling the whole token history decodes: the same tokens, log-probs to float noise."""
    res_new, new, worker = _rollout(cluster)
    assert len(new) == 6 * 3
    history: dict[int, list[int]] = {}
    stop = SamplingParams(greedy=True, max_new_tokens=8, stop=["</tool>"])
    for r in new:
        hist = history.setdefault(r[S.EPISODE_ID], list(r[S.CONTEXT_TOKEN_IDS]))
        [ref] = local.generate([hist], stop)
        assert ref.token_ids == r[S.ACTION_TOKEN_IDS]
        assert torch.allclose(torch.tensor(ref.logprobs), torch.tensor(r[S.ACTION_LOGPROBS]), atol=1e-4)
        hist += r[S.ACTION_TOKEN_IDS] + r[S.OBSERVATION_TOKEN_IDS]
    assert res_new["action_tokens"] == sum(len(r[S.ACTION_TOKEN_IDS]) for r in new)
    # both generators served sessions, and ended episodes were freed
    ray = cluster["ray"]
    stats = ray.get([g.stats.remote() for g in cluster["gens"]])
    assert all(s["reused_tokens"] > 0 for s in stats)
    assert sum(s["sessions"] for s in stats) == 0
    # streaming (next turns join the running batch as env steps return) samples the same tokens:
    # seeds are per (run seed, episode, turn), so scheduling does not change an episode
    _, s1, _ = _rollout(cluster, seed=3)
    res, s2, _ = _rollout(cluster, seed=3, streaming=True)
    assert [r[S.ACTION_TOKEN_IDS] for r in s1] == [r[S.ACTION_TOKEN_IDS] for r in s2]
    assert res["rows"] == len(s2) == 18 and [r[S.TURN_INDEX] for r in s2] == [0, 1, 2] * 6
    assert sum(s["sessions"] for s in ray.get([g.stats.remote() for g in cluster["gens"]])) == 0


def _requests(tok, hist, params=GREEDY):
    return [Request(f"p{i}", h, params) for i, h in enumerate(hist)]


def test_weight_push_between_turns_changes_outputs_and_versions(cluster, local):
    ray, tok = cluster["ray"], local.tokenizer
    pool = GeneratorPool(cluster["gens"])
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Where is Karo", "Karo Velmin", "<tool>{")]
    first = pool.generate_turns(_requests(tok, prompts))
    base = ray.get(cluster["gens"][0].version.remote())
    assert {o.version for o in first} == {base}
    new_state = _perturbed(local.model, 0.3, seed=1)
    _push(cluster, base + 1, new_state)
    obs = tok.encode("<result>Ralomek</result>", add_special_tokens=False)
    hist = [p + o.token_ids + obs for p, o in zip(prompts, first)]
    second = pool.generate_turns(_requests(tok, hist))
    local.load_state_dict(new_state, base + 1)
    local.eos_ids = {tok.eos_token_id}
    ref = local.generate(hist, GREEDY)
    for o, r in zip(second, ref):
        assert o.version == base + 1 and o.cached_tokens == 0  # KV of version `base` is not reused
        assert o.token_ids == r.token_ids
    assert pool.versions() == [base + 1, base + 1]
    pool.release([f"p{i}" for i in range(3)])
    pool.flush_releases()


def _wait_until_killed(ray, actor, instance: str, timeout_s: float = 60.0) -> None:
    """Until the killed actor's old process no longer answers (a call fails, or a new process answers)."""
    from ray.exceptions import RayActorError

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if ray.get(actor.instance_id.remote(), timeout=10) != instance:
                return
        except RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor kept answering")


def _get_when_up(ray, method, timeout_s: float = 90.0):
    """``ray.get(method.remote())``, retried while the actor is restarting."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.time() + timeout_s
    while True:
        try:
            return ray.get(method.remote(), timeout=30)
        except ActorUnavailableError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_killed_generator_comes_back_with_the_latest_weights(cluster, local):
    ray, tok = cluster["ray"], local.tokenizer
    state = _perturbed(local.model, 0.3, seed=2)
    version = ray.get(cluster["gens"][0].version.remote()) + 5
    _push(cluster, version, state)
    local.load_state_dict(state, version)
    local.eos_ids = {tok.eos_token_id}
    pool = GeneratorPool(cluster["gens"], restart_wait_s=90)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Where is Karo", "Karo Velmin", "<tool>{", "Who")]
    first = pool.generate_turns([Request(f"k{i}", p, GREEDY) for i, p in enumerate(prompts)])
    owners = {pool.owner[f"k{i}"] for i in range(4)}
    assert owners == {0, 1}  # spread over both generators
    victim = cluster["gens"][0]
    before = ray.get(victim.instance_id.remote())
    obs = tok.encode("<result>Ralomek</result>", add_special_tokens=False)
    hist = [p + o.token_ids + obs for p, o in zip(prompts, first)]
    ray.kill(victim, no_restart=False)  # dies mid-rollout, with sessions on it
    _wait_until_killed(ray, victim, before)  # ray.kill returns before the process is gone
    second = pool.generate_turns([Request(f"k{i}", h, GREEDY) for i, h in enumerate(hist)])
    assert _get_when_up(ray, victim.instance_id) != before
    assert _get_when_up(ray, victim.version) == version  # reloaded from the WeightStore before serving
    ref = local.generate(hist, GREEDY)
    for i, (o, r) in enumerate(zip(second, ref)):
        assert o.version == version and o.token_ids == r.token_ids
        if pool.owner[f"k{i}"] == 0:
            assert o.cached_tokens == 0  # its KV died with the process: re-prefilled from the history
        else:
            assert o.cached_tokens > 0
    pool.release([f"k{i}" for i in range(4)])
    pool.flush_releases()


@pytest.mark.slow  # a second actor restart (~10 s); streaming is opt-in (generators.streaming)
def test_killed_generator_during_a_streaming_rollout(cluster):
    """Polls fail or see a new instance id; outstanding turns are replayed from their histories."""
    import threading

    ray = cluster["ray"]
    ref_res, ref_rows, _ = _rollout(cluster, seed=4, streaming=True)
    victim = cluster["gens"][1]
    before = ray.get(victim.instance_id.remote())
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(zip(("res", "rows", "w"), _rollout(
        cluster, seed=4, streaming=True))))
    th.start()
    ray.kill(victim, no_restart=False)
    th.join(timeout=120)
    assert not th.is_alive()
    assert ray.get(victim.instance_id.remote()) != before
    assert [r[S.ACTION_TOKEN_IDS] for r in out["rows"]] == [r[S.ACTION_TOKEN_IDS] for r in ref_rows]
    assert {r[S.POLICY_VERSION] for r in out["rows"]} == {r[S.POLICY_VERSION] for r in ref_rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broadcast_weight_path_with_gloo(cluster, local):
    """The torch.distributed path (NCCL on GPU) exercised with gloo on CPU: learner = rank 0."""
    ray = cluster["ray"]
    port = _free_port()
    joins = [g.init_weight_group.remote("127.0.0.1", port, r + 1, 3, "gloo") for r, g in enumerate(cluster["gens"])]
    group = WeightGroup("127.0.0.1", port, 0, 3, backend="gloo", timeout_s=60)
    ray.get(joins)
    state = _perturbed(local.model, 0.3, seed=3)
    plans = plan_buckets(state, bucket_bytes=16 * 1024)
    version = ray.get(cluster["gens"][0].version.remote()) + 1
    refs = [g.receive_weights.remote(version, plans) for g in cluster["gens"]]
    group.send(state, bucket_bytes=16 * 1024)
    assert ray.get(refs) == [version, version]
    tok = local.tokenizer
    prompt = tok.encode("Where is Karo", add_special_tokens=False)
    outs = ray.get([g.generate.remote([prompt], GREEDY) for g in cluster["gens"]])
    local.load_state_dict(state, version)
    local.eos_ids = {tok.eos_token_id}
    ref = local.generate([prompt], GREEDY)[0]
    assert all(o[0].token_ids == ref.token_ids and o[0].version == version for o in outs)
    group.close()


def test_packed_buckets_round_trip_and_dedupe_tied_weights(local):
    model = local.model
    state = model.state_dict()  # tied embeddings: two names, one tensor
    buckets = pack_buckets(state, bucket_bytes=8 * 1024)
    names = [n for b in buckets for s in b.specs for n in (s.name, *s.aliases)]
    assert sorted(names) == sorted(state)
    total = sum(b.nbytes for b in buckets)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in state.values()}
    assert total < sum(unique.values()) + 16 * len(names)  # each storage sent once (plus alignment)
    for b in buckets:
        for name, t in b.tensors().items():
            assert torch.equal(t, state[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_weight_group_single_process():
    """One-rank NCCL group: send == receive on the same GPU (the multi-rank path is the gloo test)."""
    port = _free_port()
    group = WeightGroup("127.0.0.1", port, 0, 1, backend="nccl", timeout_s=60)
    state = {"w": torch.randn(4, 4, device="cuda"), "b": torch.randn(4, device="cuda", dtype=torch.bfloat16)}
    plans = group.send(state, bucket_bytes=32)
    assert [s.name for p in plans for s in p.specs] == ["w", "b"]
    group.close()


class _PushMidEpisode(ScriptedEnv):
    """A slow tool: while its first step call runs, the learner pushes new weights (as in async mode)."""

    def __init__(self, push, max_turns: int = 3):
        super().__init__(max_turns)
        self.push, self.calls = push, 0

    def step(self, episode_ids, actions, final=None):
        self.calls += 1
        if self.calls == 1:
            self.push()
        return super().step(episode_ids, actions, final)


@pytest.mark.parametrize("streaming", [False, True], ids=["turn-sync", "streaming"])
@pytest.mark.parametrize("mode", ["finish", "abort"])
def test_partial_rollouts_after_a_push_mid_episode(cluster, local, mode, streaming):
    ray = cluster["ray"]
    base = max(ray.get([g.version.remote() for g in cluster["gens"]]))
    env = _PushMidEpisode(lambda: _push(cluster, base + 1, _perturbed(local.model, 0.3, seed=7)))
    queue = ListQueue()
    worker = RolloutWorker(cluster["path"], cluster["gens"], [LocalHandle(env)], LocalHandle(queue), run_id="p",
                           max_tokens_per_turn=8, max_tokens_per_episode=200, streaming=streaming,
                           partial_rollouts=mode)
    examples = [{"question": q} for q in ("Where is Karo Velmin from?", "Who is Karo?", "Born when?")]
    res = worker.run(examples, group_size=2, first_group_id=0, first_episode_id=0,
                     params=SamplingParams(max_new_tokens=8, seed=1, stop=["</tool>"]))
    by_episode: dict[int, list[dict]] = {}
    for r in queue.rows():
        by_episode.setdefault(r[S.EPISODE_ID], []).append(r)
    # every episode reaches the queue exactly once, whole: turns 0, 1, 2, the last one flagged
    assert sorted(by_episode) == list(range(6)) and res["rows"] == 18
    for rows in by_episode.values():
        assert sorted(r[S.TURN_INDEX] for r in rows) == [0, 1, 2]
        assert [r[S.IS_LAST_TURN] for r in sorted(rows, key=lambda r: r[S.TURN_INDEX])] == [False, False, True]
    versions = {e: [r[S.POLICY_VERSION] for r in sorted(rows, key=lambda r: r[S.TURN_INDEX])]
                for e, rows in by_episode.items()}
    if mode == "finish":  # episodes go on across the push; each turn says which weights produced it
        assert res["aborted_episodes"] == 0 and res["mixed_version_episodes"] > 0
        mixed = [v for v in versions.values() if len(set(v)) > 1]
        assert len(mixed) == res["mixed_version_episodes"]
        assert all(v[0] == base and v[-1] == base + 1 and v == sorted(v) for v in mixed)
    else:  # the episodes caught by the push restarted on the new weights: one version per episode
        assert res["aborted_episodes"] > 0 and res["aborted_action_tokens"] > 0
        assert res["mixed_version_episodes"] == 0
        assert all(v == [base + 1] * 3 for v in versions.values())
    assert sum(s["sessions"] for s in ray.get([g.stats.remote() for g in cluster["gens"]])) == 0


def test_state_hash_covers_the_observation_history(cluster):
    """schema.STATE_HASH is the hash of the prompt and every observation before the turn: rows of different
    prompts that saw the same last observation are different states (GiGPO groups only equal histories)."""
    _, rows, _ = _rollout(cluster)
    by_obs: dict = {}
    for r in rows:
        if r[S.TURN_INDEX] == 0:
            continue
        prev = next(p for p in rows if p[S.EPISODE_ID] == r[S.EPISODE_ID] and p[S.TURN_INDEX] == r[S.TURN_INDEX] - 1)
        by_obs.setdefault(tuple(prev[S.OBSERVATION_TOKEN_IDS]), []).append(r)
    pairs = [(a, b) for rs in by_obs.values() for a in rs for b in rs if a[S.GROUP_ID] < b[S.GROUP_ID]]
    assert pairs, "no two prompts saw the same observation: the check would be vacuous"
    assert all(a[S.STATE_HASH] != b[S.STATE_HASH] for a, b in pairs)
    # greedy copies of one prompt took the same actions: the same history, the same state
    same = [(a, b) for a in rows for b in rows if a[S.GROUP_ID] == b[S.GROUP_ID] and a[S.EPISODE_ID] < b[S.EPISODE_ID]
            and a[S.TURN_INDEX] == b[S.TURN_INDEX]]
    assert same and all(a[S.STATE_HASH] == b[S.STATE_HASH] for a, b in same)
