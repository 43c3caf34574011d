"""The tensor-agent comparison's part of the report: a ``## Beyond LLMs`` section of ``docs/results.md``.

``turnrl experiment --config deploy/configs/arm_experiment.yaml`` (a grid whose base config is
``kind: tensor``) writes this section, its curves and ``<figures_dir>/<task>_runs.csv``; the LLM report
(``learner.results``) keeps the section when it regenerates the rest of the file, and this writer keeps
everything else. Same protocol as the LLM tasks (``learner.curve_stats``): held-out curves on reset seeds
never trained on, final figures with 95 % bootstrap intervals over seeds, area under the held-out success
curve, steps to a target, and paired per-seed differences with a verdict only when the interval excludes 0.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from learner.curve_stats import bootstrap_ci, curve_area, paired_difference, steps_to_target
from learner.experiment import ExperimentConfig, RunSpec, finished_eval

SECTION = "## Beyond LLMs"  # the heading prefix this writer owns (the LLM report keeps it)
METRIC = "success"  # the held-out curve compared (the env's success: the arm's basket)
TARGET = 0.3  # steps to target: the first held-out evaluation with success >= this
COLUMNS = (("success", "success (basket)"), ("grasped", "grasped"), ("aimed", "aimed at the hoop"),
           ("return", "return"), ("turns", "turns"))
#: paired comparisons (a, b): a - b per seed
NOTE_START, NOTE_END = "<!-- agent-discussion:start -->", "<!-- agent-discussion:end -->"  # hand-written, kept
NOTE_PLACEHOLDER = "_To be written after reading the numbers: what they say about the seed's question._"
PAIRS = (("mt_grpo_k", "grpo_or"), ("mt_grpo_k", "grpo_mr"), ("mt_ppo", "mt_grpo_k"), ("mt_ppo", "grpo_or"),
         ("grpo_mr", "grpo_or"), ("gigpo", "mt_grpo_k"), ("gigpo", "grpo_or"), ("gigpo", "mt_ppo"))


def load_agent_records(runs: list[RunSpec]) -> list[dict[str, Any]]:
    """Finished runs (``eval.json`` with ``trained`` and a held-out ``curve``)."""
    out = []
    for spec in runs:
        ev = finished_eval(spec.run_dir)
        if ev is not None and len(ev.get("curve", [])) >= 2:
            out.append({"task": spec.task, "estimator": spec.estimator, "seed": spec.seed, "name": spec.name,
                        "eval": ev})
    return out


def _ci(values: list[float]) -> str:
    return "{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap_ci(values))


def task_lines(records: list[dict[str, Any]], task: str, estimators: list[str], figure: str | None) -> list[str]:
    by_est: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r["task"] == task:
            by_est.setdefault(r["estimator"], {})[r["seed"]] = r
    ests = [e for e in estimators if e in by_est]
    if not ests:
        return [f"### {task}", "", "No finished run yet.", ""]
    lines = [f"### {task}", "",
             "| estimator | " + " | ".join(f"final {t}" for _, t in COLUMNS) + f" | area under held-out {METRIC} | "
             f"steps to {METRIC} >= {TARGET} (per seed) | greedy {METRIC} | seeds |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    figures: dict[str, dict[str, dict[int, float]]] = {}
    for est in ests:
        seeds = by_est[est]
        curves = {s: [(p["step"], p[METRIC]) for p in r["eval"]["curve"]] for s, r in seeds.items()}
        final = {s: float(r["eval"]["trained"][METRIC]) for s, r in seeds.items()}
        area = {s: curve_area(c) for s, c in curves.items()}
        reach = [steps_to_target(curves[s], TARGET) for s in sorted(curves)]
        figures[est] = {"final": final, "area": area,
                        "reach": {s: n for s, n in zip(sorted(curves), reach) if n is not None}}
        greedy = [float(r["eval"]["trained_greedy"][METRIC]) for r in seeds.values() if "trained_greedy" in r["eval"]]
        cells = [_ci([float(r["eval"]["trained"].get(c, 0.0)) for r in seeds.values()]) for c, _ in COLUMNS]
        lines.append(f"| {est} | " + " | ".join(cells) + f" | {_ci(list(area.values()))} | "
                     + ", ".join("never" if n is None else str(n) for n in reach)
                     + f" | {_ci(greedy) if greedy else 'n/a'} | {len(seeds)} |")
    lines.append("")
    for a, b in PAIRS:
        if a in figures and b in figures:
            for key, label in (("area", f"area under held-out {METRIC}"), ("final", f"final {METRIC}"),
                               ("reach", f"steps to {METRIC} >= {TARGET} (seeds where both reach it; lower is quicker)")):
                if not set(figures[a][key]) & set(figures[b][key]):
                    continue
                higher = key != "reach"
                d = paired_difference(figures[a][key], figures[b][key], higher_is_better=higher)
                better = {"a better": a, "b better": b}.get(d["verdict"])
                verdict = d["verdict"] if better is None else f"{better} {'higher' if higher else 'quicker'}"
                lines.append(f"- {a} - {b}, {label}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over seeds "
                             f"{d['seeds']}: {verdict}")
    lines.append("")
    if figure:
        lines += [f"![{task} held-out curves]({figure})", ""]
    return lines


def plot_agent_curves(records: list[dict[str, Any]], task: str, estimators: list[str], out: Path) -> Path | None:
    """Held-out success against step: mean over seeds, band = min..max of the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for i, est in enumerate(estimators):
        curves = [{p["step"]: p[METRIC] for p in r["eval"]["curve"]} for r in records
                  if r["task"] == task and r["estimator"] == est]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        cols = [[c[s] for c in curves] for s in steps]
        mean = [sum(v) / len(v) for v in cols]
        ax.plot(steps, mean, label=f"{est} ({len(curves)} seeds)", color=f"C{i}", lw=1.8)
        ax.fill_between(steps, [min(v) for v in cols], [max(v) for v in cols], color=f"C{i}", alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out {METRIC}")
    ax.set_title(f"{task}: held-out {METRIC} (mean over seeds; band: min-max)", fontsize=9)
    ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def evaluation_points(record: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """A run's held-out evaluations as (step, decoding, figures): its curve (sampled), or without one its
    ``trained`` evaluation at its last step (a warm-start run: step 0); and its greedy ``trained_greedy``."""
    ev = record["eval"]
    last = int(ev.get("steps") or 0)
    points = [(int(p["step"]), "sampled", p) for p in ev.get("curve", [])] or [(last, "sampled", ev["trained"])]
    if isinstance(ev.get("trained_greedy"), dict):
        points.append((last, "greedy", ev["trained_greedy"]))
    return points


def write_curve_csv(records: list[dict[str, Any]], keys: tuple[str, ...], path: Path) -> int:
    """``runs.csv``: one row per run x held-out evaluation (:func:`evaluation_points`) x metric (of ``keys``), to
    recompute every number from; returns the rows written. The LLM report (``learner.results``) writes its own
    with this too."""
    rows = [{"task": r["task"], "estimator": r["estimator"], "seed": r["seed"], "run": r["name"], "step": step,
             "decoding": decoding, "metric": k, "value": p[k]}
            for r in records for step, decoding, p in evaluation_points(r) for k in keys if k in p]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "estimator", "seed", "run", "step", "decoding", "metric", "value"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def _section_span(lines: list[str], prefix: str) -> tuple[int, int] | None:
    """Line range of the level-2 section whose heading starts with ``prefix`` (to the next ``## ``), or None."""
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    return start, end


def replace_section(text: str, section: str, prefix: str = SECTION, before: str = "## Discussion") -> str:
    """``text`` with its level-2 section whose heading starts with ``prefix`` replaced by ``section`` (inserted
    before the ``before`` heading, or appended, when there is none)."""
    lines = text.splitlines(keepends=True)
    block = section.rstrip("\n") + "\n\n"
    span = _section_span(lines, prefix)
    if span is None:
        at = next((i for i, line in enumerate(lines) if line.rstrip() == before), len(lines))
        span = (at, at)
    return "".join(lines[:span[0]]) + block + "".join(lines[span[1]:])


def render_agent_section(exp: ExperimentConfig, records: list[dict[str, Any]], figures: dict[str, str],
                         state: dict[str, Any], total_runs: int) -> str:
    commands = list(dict.fromkeys(s["command"] for s in state.get("sessions", []) if s.get("trained")))
    wall = sum(float(r["eval"].get("wall_time_s", 0.0)) for r in records)
    lines = [f"{SECTION}: turn-level credit for a non-LLM agent (the arm)", "",
             "Generated by `turnrl experiment` (`learner/tensor_results.py`) from the runs in "
             f"`{exp.out_dir}`: a {exp.base_config} policy (an MLP, no language model) trained through the same "
             "Ray actors, Arrow queue (tensor columns) and DeepSpeed learner, with the same registered estimators. "
             f"Held-out episodes are reset seeds never trained on. **Runs:** {len(records)} of {total_runs} finished; "
             f"seeds {exp.seeds}; every run: "
             + ", ".join(f"`{k}={v}`" for k, v in exp.common.items()) + f"; {wall / 60:.1f} min of training in all.", ""]
    if commands:
        lines += ["**Command:** " + "; ".join(f"`{c}`" for c in commands), ""]
    lines += ["Intervals: 95 % percentile bootstrap over seeds. Pairs: per-seed differences (same seed = same initial "
              "weights and the same training reset seeds for every estimator), with a verdict only when the interval "
              "excludes 0. Area: the mean level of the held-out success curve over training (quicker scores higher). "
              "Every point is in the task's `runs.csv`.", ""]
    for task, spec in exp.tasks.items():
        lines += task_lines(records, task, list(spec.estimators), figures.get(task))
    lines += ["### What this says about the seed's question", "", NOTE_START, NOTE_PLACEHOLDER, NOTE_END, ""]
    return "\n".join(lines) + "\n"


def old_section(text: str, prefix: str = SECTION) -> str | None:
    """The level-2 section of ``text`` whose heading starts with ``prefix`` (None if there is none)."""
    lines = text.splitlines(keepends=True)
    span = _section_span(lines, prefix)
    return None if span is None else "".join(lines[span[0]:span[1]])


def keep_note(old: str | None, new: str) -> str:
    """``new`` with the hand-written text between the note markers taken from ``old`` (when it has them)."""
    if not old or NOTE_START not in old or NOTE_END not in old:
        return new
    kept = old[old.index(NOTE_START):old.index(NOTE_END)]
    return new[:new.index(NOTE_START)] + kept + new[new.index(NOTE_END):]


def write_agent_report(exp: ExperimentConfig, runs: list[RunSpec], state: dict[str, Any]) -> Path:
    """Write (or replace) the section in ``exp.report.path``, its figures and CSVs; the rest of the file stays."""
    records = load_agent_records(runs)
    report = Path(exp.report.path)
    figures = {}
    for task, spec in exp.tasks.items():
        fig = plot_agent_curves(records, task, list(spec.estimators), Path(exp.report.figures_dir) / f"{task}_curves.png")
        if fig is not None:
            figures[task] = os.path.relpath(fig, report.parent)
        write_curve_csv([r for r in records if r["task"] == task], tuple(k for k, _ in COLUMNS),
                        Path(exp.report.figures_dir) / f"{task}_runs.csv")
    section = render_agent_section(exp, records, figures, state, len(runs))
    old = report.read_text() if report.exists() else "# Credit-assignment comparison\n\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(replace_section(old, keep_note(old_section(old), section)))
    return report
