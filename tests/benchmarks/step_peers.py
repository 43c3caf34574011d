"""The peers of ``bench_step.py``: what a user would run instead of turnrl on the same workload.

Both run the episodes turnrl runs, token for token in their construction: the embedded config's
questions, the policy's own chat template, ``WikiSearchEnv`` over the same BM25 index (batched
search), the observation glue of ``common.modeling.observation_glue``, the same turn caps and stop
strings, and the same rewards. What differs is how they generate and train:

* ``plain``: one process, no framework. Each turn, the live episodes' full histories go through
  HF ``generate`` (left padded, re-prefilled every turn: what ``generate`` does), then one PPO pass:
  mt_grpo turn advantages (``learner.credit``), padded batches, full logits, AdamW.
* ``trl``: TRL's ``GRPOTrainer`` with a ``rollout_func`` that runs the same multi-turn episodes through
  HF ``generate`` (TRL's own ``tools`` loop re-prefills the same way) and returns prompt ids, the
  completion (actions and observations) with an ``env_mask``, and the sampled tokens' log-probs.
  TRL computes episode-level GRPO advantages; the work per step (tokens generated and trained) is the
  same as turnrl's.

Each prints one line per timed step, `STEP` and a JSON object: ``{"step_s", "rollout_s", "update_s"}``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from common.config import torch_threads  # noqa: E402
from common.modeling import observation_glue, scrub_special_tokens  # noqa: E402


@dataclass
class Episode:
    example: dict
    group: int
    env: object
    messages: list = field(default_factory=list)
    prompt: list = field(default_factory=list)  # prompt token ids
    tokens: list = field(default_factory=list)  # prompt + actions + observations so far
    act_mask: list = field(default_factory=list)  # per token after the prompt: 1 = sampled by the policy
    logprobs: list = field(default_factory=list)  # per token after the prompt (0 on observation tokens)
    turn_of: list = field(default_factory=list)  # per token after the prompt: turn index (-1 on observations)
    turn_rewards: list = field(default_factory=list)
    outcome: float = 0.0
    done: bool = False


class HFEpisodes:
    """Multi-turn episodes through HF ``generate``, one batched call per turn over the live episodes."""

    def __init__(self, cfg, model, tokenizer):
        from env_workers.env import WikiSearchEnv
        from env_workers.index import BM25Index
        from env_workers.prepare import prepare_data
        from learner.trainer import make_env_kwargs

        self.cfg, self.model, self.tok = cfg, model, tokenizer
        self.index = BM25Index.load(str(prepare_data(cfg.data).index_dir))
        self.env_kwargs = make_env_kwargs(cfg)
        self.make_env = lambda: WikiSearchEnv(self.index, **self.env_kwargs)
        self.stop = list(cfg.generation.stop)

    @torch.no_grad()
    def run(self, examples: list[dict], group_size: int) -> tuple[list[Episode], float]:
        """``group_size`` episodes of each example; returns them and the seconds spent."""
        from env_workers.env import step_batch

        t0 = time.perf_counter()
        gc = self.cfg.generation
        eps = []
        for q, ex in enumerate(examples):
            for _ in range(group_size):
                env = self.make_env()
                messages = env.reset(ex)
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = self.tok.encode(text, add_special_tokens=False)
                eps.append(Episode(ex, q, env, messages, list(ids), list(ids)))
        pad = self.tok.pad_token_id or 0
        eos = self.tok.eos_token_id
        while True:
            live = [e for e in eps if not e.done]
            if not live:
                break
            caps = [max(1, min(gc.max_tokens_per_turn, gc.max_tokens_per_episode - len(e.tokens))) for e in live]
            width = max(len(e.tokens) for e in live)
            ids = torch.full((len(live), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, e in enumerate(live):  # left padding, as generate wants
                ids[i, width - len(e.tokens):] = torch.tensor(e.tokens)
                attn[i, width - len(e.tokens):] = 1
            out = self.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=gc.temperature,
                                      top_k=0, top_p=1.0, max_new_tokens=max(caps), stop_strings=self.stop,
                                      tokenizer=self.tok, pad_token_id=pad, eos_token_id=eos,
                                      output_scores=True, return_dict_in_generate=True)
            new = out.sequences[:, width:]
            lps = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            actions = []
            for i, e in enumerate(live):
                row = new[i].tolist()[: caps[i]]
                n = self._action_length(row)
                e._act, e._lp = row[:n], lps[i, :n].tolist()
                actions.append(self.tok.decode(e._act, skip_special_tokens=True))
            results = step_batch([e.env for e in live], actions)
            for e, action, res in zip(live, actions, results):
                self._close_turn(e, action, res, eos)
        return eps, time.perf_counter() - t0

    def _action_length(self, row: list[int]) -> int:
        """Tokens up to and including the first EOS or the token that completes a stop string."""
        eos = self.tok.eos_token_id
        for n in range(1, len(row) + 1):
            if row[n - 1] == eos:
                return n
            tail = self.tok.decode(row[max(0, n - 8):n], skip_special_tokens=False)
            if any(s in tail for s in self.stop) and not any(
                    s in self.tok.decode(row[max(0, n - 8):n - 1], skip_special_tokens=False) for s in self.stop):
                return n
        return len(row)

    def _close_turn(self, e: Episode, action: str, res, eos: int) -> None:
        """As ``actors.rollout.RolloutWorker._close_turn``: rewards, done, observation glue tokens."""
        gc = self.cfg.generation
        turn = len(e.turn_rewards)
        out_of_budget = len(e.tokens) + len(e._act) >= gc.max_tokens_per_episode
        done = bool(res.done) or out_of_budget
        e.tokens += e._act
        e.act_mask += [1] * len(e._act)
        e.logprobs += e._lp
        e.turn_of += [turn] * len(e._act)
        e.turn_rewards.append(sum((res.turn_reward or {}).values()))
        if done:
            e.done = True
            e.outcome = sum((res.outcome_reward or {}).values()) if res.done else 0.0
            return
        obs_text = scrub_special_tokens(self.tok, res.observation_text or "")
        glue = observation_glue(self.tok, e.messages, action, obs_text, bool(e._act) and e._act[-1] == eos)
        obs = self.tok.encode(glue, add_special_tokens=False)
        e.tokens += obs
        e.act_mask += [0] * len(obs)
        e.logprobs += [0.0] * len(obs)
        e.turn_of += [-1] * len(obs)
        e.messages = e.messages + [{"role": "assistant", "content": action}, {"role": "user", "content": obs_text}]


def mt_grpo_token_advantages(eps: list[Episode], cfg) -> list[list[float]]:
    """Per completion token: the episode's mt_grpo turn advantage on action tokens, 0 on observations."""
    from learner.credit import ESTIMATORS

    k = max(len(e.turn_rewards) for e in eps)
    tr = torch.zeros(len(eps), k)
    mask = torch.zeros(len(eps), k, dtype=torch.bool)
    for b, e in enumerate(eps):
        tr[b, : len(e.turn_rewards)] = torch.tensor(e.turn_rewards)
        mask[b, : len(e.turn_rewards)] = True
    a = cfg.algorithm
    adv = ESTIMATORS["mt_grpo"](tr, torch.tensor([e.outcome for e in eps]), mask,
                                torch.tensor([e.group for e in eps]), turn_coef=a.turn_coef,
                                outcome_coef=a.outcome_coef, eps=a.eps)
    return [[float(adv[b, t]) if t >= 0 else 0.0 for t in e.turn_of] for b, e in enumerate(eps)]


def run_plain(cfg, steps: int, warmup: int) -> None:
    """The single-process loop: HF generate per turn, then one PPO pass with AdamW."""
    from common.modeling import load_model, load_tokenizer
    from env_workers.demo_data import load_questions
    from env_workers.prepare import prepare_data

    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(torch_threads(cfg)[1])  # one process: every core, as turnrl's sync mode
    tok = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path)
    lc, a = cfg.learner, cfg.algorithm
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas), eps=1e-8, weight_decay=lc.weight_decay)
    episodes = HFEpisodes(cfg, model, tok)
    questions = load_questions(prepare_data(cfg.data).train, max_hops=cfg.data.max_hops)
    random.Random(cfg.run.seed).shuffle(questions)
    pad = tok.pad_token_id or 0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        model.eval()
        batch = questions[step * a.prompts_per_step:(step + 1) * a.prompts_per_step]
        eps, rollout_s = episodes.run(batch, a.group_size)
        t1 = time.perf_counter()
        model.train()
        advs = mt_grpo_token_advantages(eps, cfg)
        n_tokens = sum(sum(e.act_mask) for e in eps)
        for lo in range(0, len(eps), lc.micro_batch_size):
            mb = eps[lo:lo + lc.micro_batch_size]
            width = max(len(e.tokens) for e in mb)
            ids = torch.full((len(mb), width), pad, dtype=torch.long)
            attn, act, adv = torch.zeros_like(ids), torch.zeros(len(mb), width), torch.zeros(len(mb), width)
            for i, (e, ad) in enumerate(zip(mb, advs[lo:lo + lc.micro_batch_size])):
                n, p = len(e.tokens), len(e.prompt)
                ids[i, :n], attn[i, :n] = torch.tensor(e.tokens), 1
                act[i, p:n], adv[i, p:n] = torch.tensor(e.act_mask, dtype=torch.float), torch.tensor(ad)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1] / cfg.generation.temperature
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # [b, T-1]
            ratio = torch.exp(logp - logp.detach())  # one on-policy epoch: the behaviour policy is this one
            clipped = torch.clamp(ratio, 1 - a.clip_low, 1 + a.clip_high)
            pg = torch.maximum(-adv[:, 1:] * ratio, -adv[:, 1:] * clipped)
            loss = (pg * act[:, 1:]).sum() / n_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= warmup:
            print("STEP", json.dumps({"step_s": t2 - t0, "rollout_s": rollout_s, "update_s": t2 - t1,
                              "reward": sum(sum(e.turn_rewards) + e.outcome for e in eps) / len(eps)}), flush=True)


def run_trl(cfg, steps: int, warmup: int) -> None:
    """TRL's GRPOTrainer with a multi-turn ``rollout_func`` over the same episodes."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common.modeling import load_model, load_tokenizer
    from env_workers.demo_data import load_questions
    from env_workers.prepare import prepare_data

    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(torch_threads(cfg)[1])  # one process: every core, as turnrl's sync mode
    tok = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path)
    lc, a, gc = cfg.learner, cfg.algorithm, cfg.generation
    questions = load_questions(prepare_data(cfg.data).train, max_hops=cfg.data.max_hops)
    by_question = {q["question"]: q for q in questions}
    episodes = HFEpisodes(cfg, model, tok)
    timing = {"rollout_s": 0.0}

    def rollout_func(prompts, trainer):
        examples = [by_question[p[-1]["content"]] for p in prompts]  # G copies of each, from TRL's sampler
        was_training = trainer.model.training
        trainer.model.eval()
        eps, seconds = episodes.run(examples, 1)
        trainer.model.train(was_training)
        timing["rollout_s"] += seconds
        return {"prompt_ids": [e.prompt for e in eps],
                "completion_ids": [e.tokens[len(e.prompt):] for e in eps],
                "logprobs": [e.logprobs for e in eps], "env_mask": [e.act_mask for e in eps],
                "total_reward": [sum(e.turn_rewards) + e.outcome for e in eps]}

    def reward(prompts, completions, total_reward, **kwargs):
        return list(total_reward)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, timing["rollout_s"] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            if state.global_step > warmup:
                print("STEP", json.dumps({"step_s": dt, "rollout_s": timing["rollout_s"],
                                  "update_s": dt - timing["rollout_s"]}), flush=True)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q["question"]}]} for q in questions])
    micro = lc.micro_batch_size
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="turnrl-bench-trl-"), use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=micro, gradient_accumulation_steps=a.prompts_per_step * a.group_size // micro,
        num_generations=a.group_size, max_steps=warmup + steps, learning_rate=lc.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1], adam_epsilon=1e-8,
        weight_decay=lc.weight_decay, max_grad_norm=lc.grad_clip, beta=0.0, num_iterations=a.ppo_epochs,
        epsilon=a.clip_low, epsilon_high=a.clip_high, temperature=gc.temperature,
        max_completion_length=gc.max_tokens_per_episode, loss_type="dapo", logging_steps=1, save_strategy="no",
        seed=cfg.run.seed, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=tok, rollout_func=rollout_func, callbacks=[Timer()])
    trainer.train()
