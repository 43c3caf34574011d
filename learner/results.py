"""The comparison report: finished runs -> ``docs/results.md``, learning-curve PNGs, README block.

Numbers come from each run's ``eval.json`` (held-out evaluation of the trained policy: ``trained``
sampled at the training temperature, ``trained_greedy`` greedy) and ``metrics.jsonl`` (training
batches per step). Each cell is ``mean ± std`` over the finished seeds of one (task, estimator),
with the sample standard deviation (n - 1 in the denominator; 0 with one seed).

Regenerating keeps the hand-written ``## Discussion`` section of an existing report (from its
heading to the next ``## `` heading) and rewrites only the README lines between
``<!-- results:start -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from common import metrics as M
from learner.tensor_results import old_section, replace_section, write_curve_csv
from learner.curve_stats import bootstrap_ci, curve_area, mean_std, paired_difference, steps_to_target
from learner.evaluation import GREEDY_KEY, MULTI_HOP_KEYS, SAMPLED_KEY
from learner.evaluate import PROVENANCE
from learner.results_plots import CURVES, palette, plot_held_out, plot_task
from learner.experiment import WARM_START, ExperimentConfig, RunSpec, finished_eval

log = logging.getLogger(__name__)

# eval.json summary key -> column title (the paper's table: tool execution, search result
# contains the answer, exact match, format)
COLUMNS = (("tool_success", "tool-execution success"), ("answer_in_result", "answer in search result"),
           ("exact_match", "exact match"), ("format", "format score"))
SAMPLED, GREEDY = SAMPLED_KEY, GREEDY_KEY
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
DISCUSSION = "## Discussion"
DISCUSSION_PLACEHOLDER = (
    f"{DISCUSSION}\n\n"
    "<!-- Written by hand after reading the numbers: where the paper's claim (turn-level credit beats\n"
    "outcome-only GRPO on tool use and on the final answer) holds here and where it does not.\n"
    "`turnrl experiment` keeps this section when it regenerates the file. -->\n\n"
    "_To be written after the comparison has run._\n"
)


# ---------------------------------------------------------------------------------------------
# Pure aggregation
# ---------------------------------------------------------------------------------------------


def aggregate(records: list[dict[str, Any]], eval_key: str) -> dict[tuple[str, str], dict[str, tuple]]:
    """``{(task, estimator): {column: (mean, std, n)}}`` over the records' ``eval[eval_key]``."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in records:
        if isinstance(r["eval"].get(eval_key), dict):
            groups.setdefault((r["task"], r["estimator"]), []).append(r["eval"][eval_key])
    return {key: {col: mean_std(e[col] for e in evals if col in e) for col, _ in COLUMNS}
            for key, evals in groups.items()}


def fmt_cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None or stat[2] == 0:
        return "–"
    return f"{stat[0]:.3f} ± {stat[1]:.3f}"


def markdown_table(agg: dict[tuple[str, str], dict[str, tuple]], task: str, estimators: list[str],
                   num_seeds: int) -> str:
    """One row per estimator of ``task``: every column as mean ± std, then how many seeds finished."""
    head = "| estimator | " + " | ".join(t for _, t in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for est in estimators:
        cells = agg.get((task, est), {})
        n = max((s[2] for s in cells.values()), default=0)
        lines.append(f"| {est} | " + " | ".join(fmt_cell(cells.get(c)) for c, _ in COLUMNS)
                     + f" | {n}/{num_seeds} |")
    return "\n".join(lines)


def extract_section(text: str, heading: str) -> str | None:
    """The lines from ``heading`` up to (not including) the next level-2 heading, or None."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == heading:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("## "):
                j += 1
            return "".join(lines[i:j])
    return None


def keep_discussion(old: str | None, new: str) -> str:
    """``new`` with its Discussion section replaced by the one in ``old`` (if ``old`` has one)."""
    kept = extract_section(old, DISCUSSION) if old else None
    fresh = extract_section(new, DISCUSSION)
    if kept is None or fresh is None:
        return new
    if not kept.endswith("\n\n"):
        kept = kept.rstrip("\n") + "\n\n"
    return new.replace(fresh, kept, 1)


def replace_block(text: str, block: str, start: str = README_START, end: str = README_END) -> str | None:
    """``text`` with the lines between the ``start`` and ``end`` markers replaced; None without markers."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return None
    return text[:i + len(start)] + "\n" + block.strip("\n") + "\n" + text[j:]


# ---------------------------------------------------------------------------------------------
# Reading runs, plotting, writing
# ---------------------------------------------------------------------------------------------


def load_records(runs: list[RunSpec]) -> list[dict[str, Any]]:
    """Finished runs (``eval.json`` with a ``trained`` entry) with their eval and per-step curves."""
    records = []
    for spec in runs:
        ev = finished_eval(spec.run_dir)
        if ev is None:
            continue
        curves: dict[str, dict[int, float]] = {key: {} for key, _ in CURVES}
        metrics_path = spec.run_dir / "metrics.jsonl"
        rows = []
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.append(row)
                    for key, _ in CURVES:
                        if isinstance(row.get(key), (int, float)):
                            curves[key][int(row["step"])] = float(row[key])
        records.append({"task": spec.task, "estimator": spec.estimator, "seed": spec.seed, "name": spec.name,
                        "run_dir": spec.run_dir,
                        "eval": ev, "curves": curves, "wall_s": float(ev.get("wall_time_s", 0.0)),
                        "steps": ev.get("steps"), "generated_tokens": generated_tokens(rows)})
    return records


def generated_tokens(rows: list[dict[str, Any]]) -> float | None:
    """Action tokens the generators sampled over a run's training steps (``metrics.jsonl`` rows): each step's
    ``rollout/generated_tokens/total``, or for runs logged before it (independent episodes only) the step's
    episodes x their mean action tokens. None without step rows."""
    total, episodes_before = 0.0, 0.0
    for row in rows:
        episodes = float(row.get(M.EPISODES_TOTAL, 0.0))
        if isinstance(row.get(M.ROLLOUT_GENERATED_TOKENS), (int, float)):
            total += float(row[M.ROLLOUT_GENERATED_TOKENS])
        else:
            total += (episodes - episodes_before) * float(row.get(M.ACTION_TOKENS_MEAN, 0.0))
        episodes_before = episodes
    return total if rows else None


def _overrides_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items()) or "none"


def wall_time_line(state: dict[str, Any], records: list[dict[str, Any]], cpus: int) -> str:
    sessions = [s for s in state.get("sessions", []) if s.get("trained") or s.get("failed")]
    elapsed = sum(s.get("wall_s", 0.0) - s.get("evaluate_s", 0.0) for s in sessions)
    runs_sum = sum(r["wall_s"] for r in records)
    line = (f"**Wall time:** {elapsed / 60:.1f} min elapsed over {len(sessions)} invocation(s) that trained "
            f"runs; the {len(records)} finished runs took {runs_sum / 60:.1f} min together "
            f"(per-run `wall_time_s`), on a machine with {cpus} CPU core(s).")
    evaluated = [s for s in state.get("sessions", []) if s.get("evaluated")]
    if evaluated:
        n = sum(len(s["evaluated"]) for s in evaluated)
        line += (f" Evaluating {n} finished run(s) after training (`eval.greedy` added to the grid) took "
                 f"{sum(s.get('evaluate_s', 0.0) for s in evaluated) / 60:.1f} min more.")
    return line


def after_training_line(records: list[dict[str, Any]]) -> str | None:
    """Which greedy evaluations were taken after training from the saved policy (``learner.evaluate``), and how
    closely that policy's sampled re-evaluation matched the run's own (None when every run evaluated itself)."""
    later = [r for r in records if GREEDY in r["eval"].get(PROVENANCE, {})]
    if not later:
        return None
    checks = [r["eval"][PROVENANCE][GREEDY].get("max_diff_from_recorded", {}).get(SAMPLED) for r in later]
    checked = [c for c in checks if c is not None]
    tasks = ", ".join(f"{t} {sum(r['task'] == t for r in later)}" for t in dict.fromkeys(r["task"] for r in later))
    line = (f"The greedy evaluations of {len(later)} run(s) ({tasks}) were taken after training, from each run's "
            "saved `policy/` on the same questions (`turnrl evaluate`; eval.json `evaluated_after_training`), because "
            "those runs trained with `eval.greedy: false`.")
    if checked:
        line += (f" A sampled re-evaluation of the same saved policies differed from the runs' own sampled "
                 f"evaluations by at most {max(checked):.3f} ({len(checked)} of {len(later)} checked).")
    return line


# paired besides every estimator against MT-GRPO: turn rewards under a critic; tree rollouts against merged rewards
EXTRA_PAIRS = (("mt_ppo", "ppo"), ("tree_grpo_c4", "grpo_mr"), ("mt_grpo_judge", "mt_grpo"), ("mt_grpo_judge_rubric", "mt_grpo"))
HELD_OUT_TARGET = ("answer_in_result", 0.8)  # steps-to-target: the first held-out evaluation reaching it
EM_TARGET = ("exact_match", 0.2)  # a second target, on the answers


def _held_out(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that evaluated during training (``eval.every_steps``): a held-out curve of at least two points."""
    return [r for r in records if r["estimator"] != WARM_START and len(r["eval"].get("curve", [])) >= 2]


def warm_starts(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """(task, seed) -> the warm-start run's sampled evaluation (where every curve of that task and seed starts)."""
    return {(r["task"], r["seed"]): r["eval"][SAMPLED] for r in records if r["estimator"] == WARM_START}


def held_out_curve(record: dict[str, Any], start: dict[str, float] | None, key: str) -> list[tuple[int, float]]:
    """A run's held-out ``(step, value)`` curve of ``key``, beginning at step 0 with ``start`` (its seed's warm-start
    evaluation) when the run did not evaluate before training."""
    pts = [(int(p["step"]), float(p[key])) for p in record["eval"].get("curve", []) if key in p]
    if start is not None and key in start and pts and pts[0][0] > 0:
        pts.insert(0, (0, float(start[key])))
    return pts


def write_runs_csv(records: list[dict[str, Any]], path: Path) -> int:
    """``runs.csv``: one row per run x held-out evaluation x metric, to recompute every number from: the trained
    runs' curves and greedy evaluations, and the warm-start runs' (step 0, where a curve without one starts)."""
    kept = _held_out(records) + [r for r in records if r["estimator"] == WARM_START]
    return write_curve_csv(kept, (*(k for k, _ in COLUMNS), *MULTI_HOP_KEYS), path)


def per_seed_steps(curves: dict[int, list[tuple[int, float]]], target: float) -> str:
    """The steps at which each seed's curve (in seed order) first reaches ``target``: "never" if it does not, "–"
    for a seed whose curve lacks the metric."""
    return ", ".join("–" if not curves[s] else str(n) if (n := steps_to_target(curves[s], target)) is not None
                     else "never" for s in sorted(curves))


def held_out_section(records: list[dict[str, Any]], order: dict[str, list[str]]) -> list[str]:
    """Per task: final exact match (sampled, and greedy where evaluated) and area under the held-out
    answer-in-result curve with 95 % bootstrap intervals, steps to each target per seed, the action tokens
    sampled per run (what a run cost: a tree samples its shared turns once), and each estimator paired (same
    seeds) against MT-GRPO."""
    runs = _held_out(records)
    if not runs:
        return []
    key, target = HELD_OUT_TARGET
    lines = ["## Held-out learning (`eval.every_steps`)", "",
             f"From each run's held-out curve (`eval.json` `curve`; every point in `runs.csv`): final exact match "
             "(sampled; greedy from `trained_greedy`), "
             f"areas under the {key} and {EM_TARGET[0]} curves (their mean level over training: quicker scores "
             f"higher), and the first evaluated step with {key} >= {target} and with {EM_TARGET[0]} >= "
             f"{EM_TARGET[1]}; a curve starts at step 0 with the seed's warm-start run when the "
             "run did not evaluate before training. Intervals: 95 % percentile bootstrap over seeds. Pairs: "
             "the per-seed difference (same seed = same data order and warm start), with a verdict only when "
             "its interval excludes 0.", ""]
    start = warm_starts(records)
    for task, estimators in order.items():
        by_est: dict[str, dict[int, dict[str, Any]]] = {}
        for r in runs:
            if r["task"] == task:
                by_est.setdefault(r["estimator"], {})[r["seed"]] = r
        if not by_est:
            continue
        lines += [f"### {task}", "", f"| estimator | final exact match | final greedy exact match | area under {key} | "
                  f"area under {EM_TARGET[0]} | "
                  f"steps to {key} >= {target} (per seed) | steps to {EM_TARGET[0]} >= {EM_TARGET[1]} (per seed) | "
                  "generated tokens per run (k) | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        figures: dict[str, dict[str, dict[int, float]]] = {}
        for est in [e for e in estimators if e in by_est]:
            seeds = by_est[est]
            curves = {s: held_out_curve(r, start.get((task, s)), key) for s, r in seeds.items()}
            em = {s: float(r["eval"][SAMPLED]["exact_match"]) for s, r in seeds.items()}
            greedy = {s: float(r["eval"][GREEDY]["exact_match"]) for s, r in seeds.items()
                      if "exact_match" in (r["eval"].get(GREEDY) or {})}
            em_curves = {s: held_out_curve(r, start.get((task, s)), EM_TARGET[0]) for s, r in seeds.items()}
            area = {s: curve_area(c) for s, c in curves.items()}
            em_area = {s: curve_area(c) for s, c in em_curves.items() if c}
            figures[est] = {"em": em, "area": area, "em_area": em_area, "greedy": greedy}
            reach, reach_em = per_seed_steps(curves, target), per_seed_steps(em_curves, EM_TARGET[1])
            ci = lambda d: "{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap_ci(list(d.values())))  # noqa: E731
            tokens = [r["generated_tokens"] for r in seeds.values() if r.get("generated_tokens") is not None]
            cost = f"{sum(tokens) / len(tokens) / 1e3:.0f}" if tokens else "n/a"
            lines.append(f"| {est} | {ci(em)} | {ci(greedy) if greedy else '–'} | {ci(area)} | "
                         f"{ci(em_area) if em_area else '–'} | {reach} | {reach_em} | "
                         f"{cost} | {len(seeds)} |")
        lines.append("")
        ref = next((e for e in ("mt_grpo", "mt_grpo_k") if e in figures), None)
        pairs = [(ref, e) for e in figures if ref and e != ref]
        pairs += [(a, b) for a, b in EXTRA_PAIRS if a in figures and b in figures]
        for ref, est in pairs:
            for name, label in (("area", f"area under {key}"), ("em_area", f"area under {EM_TARGET[0]}"),
                                ("em", "final exact match"), ("greedy", "final greedy exact match")):
                if not set(figures[ref][name]) & set(figures[est][name]):
                    continue  # e.g. no greedy evaluation in these runs
                d = paired_difference(figures[ref][name], figures[est][name])
                verdict = {"a better": f"{ref} higher", "b better": f"{est} higher"}.get(d["verdict"], d["verdict"])
                lines.append(f"- {ref} - {est}, {label}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                             f"over seeds {d['seeds']}: {verdict}")
        lines.append("")
    return lines


def second_search_section(records: list[dict[str, Any]], order: dict[str, list[str]]) -> list[str]:
    """Per task with questions of two or more hops: does a policy make the second search, and a correct one?
    Mean [95 % bootstrap interval] over seeds of the trained policies' (and the warm start's) held-out figures
    over those questions only (``learner.evaluation.multi_hop_summary``)."""
    lines: list[str] = []
    cols = (("multi_hop_answer_in_result", "correct second search (answer in a result)"),
            ("multi_hop_two_searches", "two or more searches"), ("multi_hop_searches", "searches per episode"),
            ("multi_hop_exact_match", "exact match"))
    for task, estimators in order.items():
        by_est: dict[str, list[dict[str, float]]] = {}
        for r in records:
            ev = r["eval"].get(SAMPLED, {})
            if r["task"] == task and cols[0][0] in ev:
                by_est.setdefault(r["estimator"], []).append(ev)
        if not by_est:
            continue
        n_q = int(next(iter(by_est.values()))[0].get("multi_hop_questions", 0))
        lines += [f"### {task}: the second search ({n_q} held-out questions of two hops per run)", "",
                  "On the demo data a two-hop answer is only in the bridge entity's article, which the question "
                  "does not name: answer-in-result on these questions is the share of episodes whose second "
                  "search found it.", "",
                  "| estimator | " + " | ".join(t for _, t in cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
        for est in [e for e in estimators if e in by_est]:
            evs = by_est[est]
            cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap_ci([float(e[k]) for e in evs])) for k, _ in cols]
            lines.append(f"| {est} | " + " | ".join(cells) + f" | {len(evs)} |")
        lines.append("")
    return ["## Multi-hop: the second search", "", *lines] if lines else []


def render(exp: ExperimentConfig, records: list[dict[str, Any]], state: dict[str, Any], figures: dict[str, Path],
           report_path: Path, cpus: int, total_runs: int) -> tuple[str, str]:
    """The report's Markdown and the README block."""

    n_seeds = len(exp.seeds)
    out_dir = records[0]["run_dir"].parent if records else Path(exp.out_dir)
    order = {t: ([WARM_START] if exp.warm_start_baseline else []) + list(spec.estimators)
             for t, spec in exp.tasks.items()}
    commands = list(dict.fromkeys(s["command"] for s in state.get("sessions", [])
                                  if s.get("trained") or s.get("failed") or s.get("evaluated")))
    command = ("**Command:** `" + commands[0] + "`" if len(commands) == 1 else
               "**Commands** (in order of first use): " + "; ".join(f"`{c}`" for c in commands) if commands
               else "**Command:** `turnrl experiment --config <experiment.yaml>` (no recorded invocation)")
    sampled, greedy = aggregate(records, SAMPLED), aggregate(records, GREEDY)

    def tables(agg: dict, level: str) -> list[str]:
        out = []
        for task, spec in exp.tasks.items():
            out += [f"{level} {task} ({_overrides_text(spec.overrides)})", "",
                    markdown_table(agg, task, order[task], n_seeds), ""]
        return out

    lines = [
        "# Credit-assignment comparison", "",
        "Generated by `turnrl experiment` (`learner/results.py`) from the run directories in "
        f"`{out_dir}`. Everything except the Discussion section is rewritten when it runs again; "
        "`turnrl experiment --report-only` regenerates it from the finished runs.", "",
        command, "",
        wall_time_line(state, records, cpus), "",
        f"**Runs:** {len(records)} of {total_runs} finished; seeds {exp.seeds}; base config "
        f"`{exp.base_config}`; every run: {_overrides_text(exp.common)}.", "",
        "Each cell is the held-out evaluation of the trained policy (questions about people never seen "
        "in training): mean ± sample std over seeds. `warm_start` is the untrained starting policy on "
        "the same questions. Columns: tool-execution success (the episode called the tool and every call "
        "ran), answer in search result (some search result contained an answer alias), exact match of "
        "the final answer, format score (mean format reward).", "",
        "## Results: sampled evaluation (training temperature)", "", *tables(sampled, "###"),
        "## Results: greedy evaluation", "",
    ]
    if greedy:
        later = after_training_line(records)
        lines += ([later, ""] if later else []) + tables(greedy, "###")
    else:
        lines += ["Not measured (`eval.greedy: false` in these runs).", ""]
    lines += held_out_section(records, order)
    lines += second_search_section(records, order)
    lines += [DISCUSSION_PLACEHOLDER.rstrip("\n"), "", "## Learning curves", ""]
    key, target = HELD_OUT_TARGET
    captions = {
        "held_out": f"Held-out evaluations (questions never trained on) against training step, from step 0 (the warm "
                    "start): mean over seeds, band: 95 % bootstrap interval of the mean. Right: steps to held-out "
                    f"{key} >= {target}, per seed (dots; x: not reached within the budget), bar: the median "
                    "(hatched when most seeds never reached it).",
        "training": "Training-batch metrics per step, smoothed per seed with a moving average of "
                    f"{exp.report.smooth} step(s), then averaged over seeds (band: ± 1 std).",
    }
    for task, figs in figures.items():
        for kind, fig in figs:
            rel = os.path.relpath(fig, report_path.parent)
            lines += [f"![{task} {kind.replace('_', '-')} curves]({rel})", "", captions[kind], ""]
    if not figures:
        lines += ["No finished run logged a training step yet.", ""]
    lines += ["## Runs", "", "| run | steps | " + " | ".join(t for _, t in COLUMNS) + " | wall s |",
              "|" + "---|" * (len(COLUMNS) + 3)]
    for r in sorted(records, key=lambda r: (r["task"], r["estimator"], r["seed"])):
        ev = r["eval"][SAMPLED]
        lines.append(f"| {r['name']} | {r['steps']} | " + " | ".join(f"{ev.get(c, math.nan):.3f}" for c, _ in COLUMNS)
                     + f" | {r['wall_s']:.0f} |")
    report = "\n".join(lines) + "\n"

    rel_report = os.path.relpath(report_path, Path(exp.report.readme).parent if exp.report.readme else ".")
    block = [f"Sampled held-out evaluation, mean ± std over seeds ({len(records)} of {total_runs} runs finished; "
             f"details, greedy numbers and learning curves in [{rel_report}]({rel_report})):", "",
             *tables(sampled, "####"), wall_time_line(state, records, cpus)]
    return report, "\n".join(block)


HELD_OUT_PANELS = (("answer_in_result", "held-out answer in search result"), ("exact_match", "held-out exact match"),
                   ("multi_hop_answer_in_result", "held-out correct second search (two-hop questions)"))


def plot_task_held_out(records: list[dict[str, Any]], task: str, estimators: list[str], out_path: Path,
                       colours: dict[str, str]) -> Path | None:
    """``<task>_held_out.png``: the held-out curves of :data:`HELD_OUT_PANELS` the runs evaluated, from step 0,
    and the steps to :data:`HELD_OUT_TARGET` (``learner.results_plots.plot_held_out``)."""
    runs = [r for r in _held_out(records) if r["task"] == task]
    if not runs:
        return None
    start = warm_starts(records)
    curves = lambda key: {est: [held_out_curve(r, start.get((task, r["seed"])), key)  # noqa: E731
                                for r in runs if r["estimator"] == est] for est in estimators}
    panels = [(title, curves(key)) for key, title in HELD_OUT_PANELS
              if any(key in p for r in runs for p in r["eval"]["curve"])]
    key, target = HELD_OUT_TARGET
    reached = {est: [steps_to_target(c, target) for c in cs] for est, cs in curves(key).items()}
    budget = max(int(r["steps"] or 0) for r in runs)
    return plot_held_out(panels, reached, budget, f"held-out {key} >= {target}",
                         f"{task}: held-out evaluations, mean over seeds (band: 95 % bootstrap interval)", out_path,
                         colours)


def write_report(exp: ExperimentConfig, runs: list[RunSpec], state: dict[str, Any], cpus: int) -> Path:
    """Write the report and figures for every finished run of ``runs``; update the README block."""

    records = load_records(runs)
    report_path = Path(exp.report.path)
    names = list(dict.fromkeys(e for spec in exp.tasks.values() for e in spec.estimators if e != WARM_START))
    colours = palette(names)
    figures: dict[str, list[tuple[str, Path]]] = {}
    for task, spec in exp.tasks.items():
        estimators = [e for e in spec.estimators if e != WARM_START]
        held = plot_task_held_out(records, task, estimators, Path(exp.report.figures_dir) / f"{task}_held_out.png",
                                  colours)
        train_fig = plot_task(records, task, estimators, Path(exp.report.figures_dir) / f"{task}_curves.png",
                              exp.report.smooth, colours)
        figs = [("held_out", held), ("training", train_fig)]
        if any(f is not None for _, f in figs):
            figures[task] = [(k, f) for k, f in figs if f is not None]
    if _held_out(records):
        write_runs_csv(records, Path(exp.report.figures_dir) / "runs.csv")
    report, block = render(exp, records, state, figures, report_path, cpus, len(runs))
    old = report_path.read_text() if report_path.exists() else None
    report_path.parent.mkdir(parents=True, exist_ok=True)
    text = keep_discussion(old, report)
    agent_section = old_section(old) if old else None  # the tensor-agent section (learner/tensor_results.py) stays
    report_path.write_text(replace_section(text, agent_section) if agent_section else text)
    if exp.report.readme:
        readme = Path(exp.report.readme)
        text = readme.read_text() if readme.exists() else ""
        updated = replace_block(text, block)
        if updated is None:
            log.warning("%s has no %s ... %s block; the headline table was not copied there", readme,
                        README_START, README_END)
        elif updated != text:
            readme.write_text(updated)
    return report_path
