"""``REPORT.md`` of the reproduction study: every number read from the run directory, figures as PNG.

The report is regenerated from files alone (scores, model manifests, judgements), so it can be
rebuilt at any time and shows which stages are still missing. The narrative parts that do not depend
on the numbers (the paper's claim, how our setting differs) are fixed text; the conclusions are
derived from the paired comparisons, never written by hand.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..method.pairwise import OUTCOME_VALUE, mean_interval
from ..method.selection import BASELINE, demo_trimmed, ratio_label, subset_size
from ..runtime.io import atomic_open, read_jsonl, save_png, write_json
from .plots import outcome_bars
from .report import fmt, jaccard, row_source_files, spearman, summary_stats

if TYPE_CHECKING:
    from .study import Study

ALPACA_52K = 52_002
JUDGED_OUTPUTS = ("table.csv", "winning_scores.png", "win_tie_lose.png")


def judge_ids(rows: Sequence[Mapping]) -> list[str]:
    """The judges as named in tables and records (e.g. ``embedding-cosine:all-MiniLM-L6-v2``), in order."""
    return list(dict.fromkeys(r["judge"] for r in rows))


def judge_note(judge_id: str) -> str:
    return JUDGE_NOTES.get(judge_id.split(":")[0], "")
JUDGE_NOTES = {  # by the judge id's prefix
    "reference-nll": "the model that gives the GPT-4 reference answer the lower per-token NLL wins (a likelihood "
                     "judge: it scores the model, not the generated text)",
    "embedding-cosine": "the answer whose all-MiniLM-L6-v2 embedding is closer (cosine) to the reference wins",
    "rougeL-f1": "the answer with the higher ROUGE-L F1 against the reference wins",
}


def outcome_values(records: Sequence[Mapping]) -> dict[tuple[str, str], dict[tuple[str, str], int]]:
    """``{(judge, model_a): {(dataset, id): +1 | 0 | -1}}`` from judgement records."""
    table: dict[tuple[str, str], dict[tuple[str, str], int]] = {}
    for r in records:
        table.setdefault((r["judge"], r["model_a"]), {})[(r["dataset"], r["id"])] = OUTCOME_VALUE[r["outcome"]]
    return table


def paired_difference(a: Mapping[tuple[str, str], float], b: Mapping[tuple[str, str], float],
                      n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Winning-score difference A − B on the prompts both were judged on, with a paired bootstrap interval.

    Both models were compared with the same full-pool model on the same prompts, so resampling prompts
    (the per-prompt differences, not the two models independently) is what measures how sure it is.
    """
    keys = sorted(set(a) & set(b))
    diff = [a[k] - b[k] for k in keys]
    low, high = mean_interval(diff, n_resamples, level, seed)
    return {"n": len(keys), "difference": float(np.mean(diff)) if diff else math.nan, "ci_low": low, "ci_high": high}


def averaged(values: Sequence[Mapping[tuple[str, str], int]]) -> dict[tuple[str, str], float]:
    """Per prompt, the mean outcome over several models (the random seeds): their average winning score."""
    keys = set.intersection(*(set(v) for v in values)) if values else set()
    return {k: float(np.mean([v[k] for v in values])) for k in keys}


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _manifest(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _from_repo(path) -> str:
    """A path as a reader of the repository types it: relative to its root when inside it."""
    from .pipeline import repo_root

    try:
        return Path(path).resolve().relative_to(repo_root()).as_posix()
    except (TypeError, ValueError):  # no file (a config given as a mapping), or one outside the repository
        return str(path)


def _f(value, spec: str = ".3f") -> str:
    return fmt(value, spec)


def _setting(study: Study) -> str:
    c = study.config
    score, train, gen = c.score_config(), c.train_config(), c.generate_config()
    sizes = ", ".join(f"{100 * r:g}% = {subset_size(len(study.pool), r)} rows" for r in sorted(c.ratios))
    tests = ", ".join(f"{name} ({'all' if n is None else f'{n} sampled, seed {c.test_seed}'})"
                      for name, n in c.test_sets.items())
    epochs = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epoch(s)"
    lines = [
        "| | paper | here |", "|---|---|---|",
        "| model | LLaMA-2-7B (and others), full fine-tuning | "
        f"`{score.model}` (base model), scored in {score.dtype} |",
        f"| pool | Alpaca-52K | `{c.data}`: {len(study.pool):,} rows |",
        f"| ratios | 1 % (5/10/15 % in ablations) | {sizes} |",
        f"| baselines | IFD (Cherry), random, full data | {', '.join(c.methods)}"
        f"{f' (random: seeds {c.random_seeds})' if 'random' in c.methods else ''}, full pool |",
        f"| fine-tuning | full fine-tuning, 3 epochs | {'LoRA' if train.method == 'lora' else 'full fine-tuning'} (r={train.lora_r}, alpha={train.lora_alpha}, "
        f"all linear layers), {epochs}, lr {train.resolved_learning_rate():g}, effective batch "
        f"{train.batch_size * train.gradient_accumulation_steps}, max length {train.max_length}, "
        f"{train.sampling.replace('_', ' ')} batches; identical for every model |",
        f"| test sets | Vicuna, Koala, WizardLM, Self-Instruct, LIMA | {tests} |",
        f"| generation | – | greedy, at most {gen.max_new_tokens} new tokens |",
        f"| judge | GPT-4, both answer orders | offline reference judges, both answer orders: "
        f"{', '.join(f'`{j}`' for j in c.judges)} |",
    ]
    return "\n".join(lines)


def _scoring_section(study: Study, figures: dict[str, str]) -> tuple[str, list[dict] | None]:
    manifest = _manifest(study.scores_dir / "manifest.json")
    if not study.scores_path.exists() or not manifest or manifest.get("status") != "complete":
        return "Not run yet (stage `score`).", None
    scores = read_jsonl(study.scores_path)
    timings = [t for t in _timings(study) if t["stage"] == "score"]
    rows_timed = sum(t.get("rows") or 0 for t in timings)
    seconds = sum(t.get("seconds_scoring") or 0 for t in timings)
    miwv = [s["miwv"] for s in scores]
    stats = summary_stats(miwv)
    positive = sum(1 for v in miwv if v is not None and v > 0)
    rho = spearman(miwv, [s.get("ifd") for s in scores])
    env = manifest.get("environment", {})
    lines = [
        f"- {len(scores):,} rows scored with `{manifest['fingerprint_inputs']['model']}` in "
        f"{manifest['fingerprint_inputs']['dtype']} (max length {manifest['fingerprint_inputs']['max_length']}), "
        f"embedder `{manifest['fingerprint_inputs']['embedder']}`.",
    ]
    if rows_timed and seconds:
        lines.append(f"- Time: {seconds / 3600:.2f} h of scoring for {rows_timed:,} rows, "
                     f"**{seconds / rows_timed:.2f} s/sample** ({rows_timed / seconds:.2f} samples/s) on "
                     f"{env.get('device') or env.get('platform') or 'this machine'}"
                     f"{', over several resumed runs' if len(timings) > 1 else ''} (wall time: it counts "
                     "whatever else the machine was doing, so it bounds the cost from above).")
    lines += [
        f"- MIWV: median {stats['median']:.3f}, range {stats['min']:.3f} to {stats['max']:.3f}; "
        f"{positive:,} rows ({positive / len(scores):.1%}) have MIWV > 0 (the neighbour's example made the loss worse).",
        f"- Spearman correlation of MIWV with IFD: {rho:.3f}.",
        f"- Rows whose one-shot sequence was truncated: {sum(s['truncated'] for s in scores)} "
        f"({demo_trimmed(scores)} with a trimmed demonstration); rows without MIWV: "
        f"{sum(s['miwv'] is None for s in scores)}.",
    ]
    if "scores" in figures:
        lines += ["", f"![MIWV and IFD]({figures['scores']})"]
    return "\n".join(lines), scores


def _selection_section(study: Study, scores: list[dict] | None) -> str:
    if scores is None:
        return "Needs the scores."
    plan = study.selections(scores)
    sources = row_source_files(study.pool.files, len(study.pool)) if study.pool.files else None
    lines = ["| subset | rows | rows with a trimmed demo | median response tokens | mean MIWV | mean IFD | "
             "share per source file |", "|---|---:|---:|---:|---:|---:|---|"]
    for arm in study.arms:
        idx = plan[arm.name]
        resp = [scores[i]["response_tokens"] for i in idx]
        share = ""
        if sources:
            counts: dict[str, int] = {}
            for i in idx:
                counts[sources[i]] = counts.get(sources[i], 0) + 1
            share = ", ".join(f"{k} {v / len(idx):.0%}" for k, v in sorted(counts.items()))
        lines.append(f"| {arm.name} | {len(idx):,} | {demo_trimmed([scores[i] for i in idx])} | {np.median(resp):.0f} | "
                     f"{_f(_mean([scores[i]['miwv'] for i in idx]))} | {_f(_mean([scores[i]['ifd'] for i in idx]))} | "
                     f"{share} |")
    lines += ["", "Overlap (Jaccard) between the subsets of the same size:", ""]
    for ratio in sorted(study.config.ratios):
        arms = [a for a in study.arms if a.ratio == ratio]
        header = " | ".join(a.name for a in arms)
        lines += [f"| {ratio_label(ratio)} | {header} |", "|---|" + "---:|" * len(arms)]
        for a in arms:
            cells = " | ".join(f"{jaccard(plan[a.name], plan[b.name]):.2f}" for b in arms)
            lines.append(f"| {a.name} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _training_section(study: Study, figures: dict[str, str]) -> str:
    lines = ["| model | rows | optimizer steps | final train loss | time | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    missing = []
    for arm in study.arms:
        m = _manifest(study.model_dir(arm) / "manifest.json")
        if not m or m.get("status") != "complete":
            missing.append(arm.name)
            continue
        lines.append(f"| {arm.name} | {m['rows']:,} | {m['steps']} | {_f(m.get('train_loss'))} | "
                     f"{_f((m.get('seconds') or math.nan) / 60, '.1f')} min | {_f(m.get('tokens_per_second'), '.0f')} |")
    if missing:
        lines += ["", f"Not trained yet: {', '.join(missing)}."]
    if "training" in figures:
        lines += ["", f"![training loss]({figures['training']})"]
    return "\n".join(lines)


def _evaluation_tables(study: Study, table: list[dict]) -> str:
    """Per judge: every subset model against the full-pool model over all test sets (and per set)."""
    sets = study.test_set_labels
    lines = []
    for judge in judge_ids(table):
        rows = [r for r in table if r["judge"] == judge]
        lines += [f"**Judge `{judge}`**: {judge_note(judge)}.", "",
                  "| model vs full | " + " | ".join(f"{s} WS" for s in sets) +
                  " | All: win / tie / lose | All: winning score [95% CI] |",
                  "|---|" + "---:|" * len(sets) + "---|---|"]
        for arm in study.arms:
            mine = {r["test_set"]: r for r in rows if r["model_a"] == arm.name}
            if "All" not in mine:
                continue
            a = mine["All"]
            per_set = " | ".join(_f(float(mine[s]["winning_score"])) if s in mine else "–" for s in sets)
            lines.append(f"| {arm.name} | {per_set} | {a['wins']} / {a['ties']} / {a['losses']} | "
                         f"**{float(a['winning_score']):.3f}** [{float(a['ci_low']):.3f}, {float(a['ci_high']):.3f}] |")
        lines.append("")
    return "\n".join(lines)


def _answer_lengths(study: Study) -> str:
    """Median answer length per model and test set, beside the reference's: the text judges reward
    answers that resemble the reference, so a subset that teaches short or long answers shows here."""
    sets = study.test_set_labels
    medians: dict[str, dict[str, float]] = {}
    references: dict[str, float] = {}
    for arm in filter(study.is_answered, study.arms):
        medians[arm.name] = {}
        for d in sets:
            rows = read_jsonl(study.generations_dir / arm.name / f"{d}.jsonl")
            medians[arm.name][d] = float(np.median([len(r["output"].split()) for r in rows]))
            if d not in references and all(r.get("reference") for r in rows):
                references[d] = float(np.median([len(r["reference"].split()) for r in rows]))
    if not medians:
        return ""
    lines = ["Median answer length in words (greedy, at most "
             f"{study.config.generate_config().max_new_tokens} new tokens):", "",
             "| model | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for name, per_set in medians.items():
        lines.append(f"| {name} | " + " | ".join(f"{per_set[d]:.0f}" for d in sets) + " |")
    if references:
        lines.append("| *reference (GPT-4)* | " + " | ".join(_f(references.get(d), ".0f") for d in sets) + " |")
    return "\n".join(lines)


def comparisons(study: Study, records: Sequence[Mapping]) -> list[dict]:
    """MIWV's subset against each baseline's at the same ratio, per judge (paired over prompts)."""
    values = outcome_values(records)
    out = []
    for judge in judge_ids(records):
        for ratio in sorted(study.config.ratios):
            arms = [a for a in study.arms if a.ratio == ratio]
            miwv = next((a for a in arms if a.method == "miwv"), None)
            if miwv is None or (judge, miwv.name) not in values:
                continue
            mine = values[(judge, miwv.name)]
            baselines: dict[str, dict] = {}
            for method in dict.fromkeys(a.method for a in arms if a.method != "miwv"):
                group = [values[(judge, a.name)] for a in arms if a.method == method and (judge, a.name) in values]
                if group:
                    baselines[method] = averaged(group) if len(group) > 1 else group[0]
            baselines["full"] = {k: 0.0 for k in mine}  # the full model against itself: winning score 1
            for method, theirs in baselines.items():
                d = paired_difference(mine, theirs, study.config.n_bootstrap)
                out.append({"judge": judge, "ratio": ratio, "miwv": miwv.name, "baseline": method, **d,
                            "miwv_score": 1 + float(np.mean(list(mine.values()))),
                            "baseline_score": 1 + float(np.mean([theirs[k] for k in mine if k in theirs]))})
    return out


def _verdict(c: Mapping) -> str:
    if c["ci_low"] > 0:
        return "MIWV better (interval above 0)"
    if c["ci_high"] < 0:
        return "MIWV worse (interval below 0)"
    return "no clear difference (interval contains 0)"


def _conclusions(study: Study, comps: list[dict]) -> str:
    if not comps:
        return "Needs the judgements."
    lines = ["Paired differences of winning score, MIWV subset minus the baseline at the same size (both compared "
             "with the full-pool model on the same prompts; 'full' means MIWV's own score minus 1), with paired "
             "bootstrap 95 % intervals over prompts:", "",
             "| judge | ratio | baseline | MIWV WS | baseline WS | difference [95% CI] | reading |",
             "|---|---|---|---:|---:|---|---|"]
    for c in comps:
        lines.append(f"| {c['judge']} | {ratio_label(c['ratio'])} | {c['baseline']} | {c['miwv_score']:.3f} | "
                     f"{c['baseline_score']:.3f} | {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
                     f"{_verdict(c)} |")
    tally: dict[str, dict[str, int]] = {}
    for c in comps:
        row = tally.setdefault(c["baseline"], {"better": 0, "worse": 0, "unclear": 0})
        row["better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "unclear"] += 1
    lines += ["", "Over all judges and ratios:", ""]
    for baseline, t in tally.items():
        total = sum(t.values())
        lines.append(f"- against **{baseline}**: MIWV clearly better in {t['better']} of {total} comparisons, "
                     f"clearly worse in {t['worse']}, no clear difference in {t['unclear']}.")
    lines += ["", _bottom_line(study, tally)]
    return "\n".join(lines)


def _reading(t: Mapping[str, int]) -> str:
    total = sum(t.values())
    if t["better"] == total:
        return "better under every judge and ratio"
    if t["worse"] == total:
        return "worse under every judge and ratio"
    if t["better"] and not t["worse"]:
        return f"better in {t['better']} of {total} comparisons and not clearly different in the rest"
    if t["worse"] and not t["better"]:
        return f"worse in {t['worse']} of {total} comparisons and not clearly different in the rest"
    if not t["better"] and not t["worse"]:
        return "not clearly different under any judge or ratio"
    return f"mixed: better in {t['better']}, worse in {t['worse']}, unclear in {t['unclear']} of {total} comparisons"


def _bottom_line(study: Study, tally: Mapping[str, Mapping[str, int]]) -> str:
    """The plain-language reading of the tally; every word of it follows from the numbers above."""
    full = tally.get("full")
    lines = []
    if full:
        reproduced = ("**reproduced here**" if full["better"] == sum(full.values()) else
                      "**not reproduced here**" if full["better"] == 0 else "**only partly reproduced here**")
        lines.append(f"**Bottom line.** The paper's headline claim, that a small MIWV subset beats fine-tuning on "
                     f"the whole pool, is {reproduced}: the MIWV model is {_reading(full)} against the full-pool model.")
    others = [f"{_reading(t)} against **{b}**" for b, t in tally.items() if b != "full"]
    if others:
        lines.append("Against the other selections of the same size, MIWV is " + "; ".join(others) + ".")
    steps = {arm.name: _manifest(study.model_dir(arm) / "manifest.json")["steps"]
             for arm in filter(study.is_trained, study.arms)}
    subset_steps = sorted({v for name, v in steps.items() if name != BASELINE})
    if BASELINE in steps and subset_steps:
        lines.append(f"Every model trains for the same number of epochs, so a subset model takes "
                     f"{' or '.join(str(v) for v in subset_steps)} optimizer steps against the full-pool model's "
                     f"{steps[BASELINE]}: against the full pool, a subset is compared at a fraction of the compute, "
                     "as in the paper's setting.")
    return " ".join(lines)


def _timings(study: Study) -> list[dict]:
    path = study.run_dir / "timings.jsonl"
    return read_jsonl(path) if path.exists() else []


def _status(study: Study) -> list[str]:
    """The stages whose outputs are missing, for the report's header."""
    missing = []
    if not study.scores_path.exists():
        missing.append("score")
    untrained = [a.name for a in study.arms if not study.is_trained(a)]
    if untrained:
        missing.append(f"train ({len(untrained)} of {len(study.arms)} models)")
    ungenerated = [a.name for a in study.arms if not study.is_answered(a)]
    if ungenerated:
        missing.append(f"generate ({len(ungenerated)} of {len(study.arms)} models)")
    verdicts = study.evaluation_dir / "judgements.jsonl"
    judged = {r["model_a"] for r in read_jsonl(verdicts)} if verdicts.exists() else set()
    unjudged = [a.name for a in study.arms if a.name != BASELINE and a.name not in judged]
    if unjudged:
        missing.append(f"judge ({len(unjudged)} of {len(study.arms) - 1} models)")
    return missing


def _save(fig, path: Path) -> str:
    return save_png(fig, path, dpi=120, close=True).name


def _judge_panels(study: Study, table: list[dict]):
    """A figure with one panel per judge, sharing one row per subset model: (fig, axes, judges, arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = judge_ids(table)
    arms = [a for a in study.arms if a.method != BASELINE]
    fig, axes = plt.subplots(1, len(judges), figsize=(4.2 * len(judges), 0.32 * len(arms) + 1.6), sharey=True,
                             squeeze=False)
    return fig, axes, judges, arms


def winning_score_figure(study: Study, table: list[dict]):
    """One panel per judge: each subset model's winning score against the full-pool model, with its interval."""
    fig, axes, judges, arms = _judge_panels(study, table)
    colors = {"miwv": "#C44E52", "ifd": "#4C72B0", "low-miwv": "#8172B2", "random": "#8C8C8C", "length": "#55A868"}
    for ax, judge in zip(axes[0], judges):
        rows = {r["model_a"]: r for r in table if r["judge"] == judge and r["test_set"] == "All"}
        for y, arm in enumerate(arms):
            r = rows.get(arm.name)
            if r is None:
                continue
            ws, lo, hi = float(r["winning_score"]), float(r["ci_low"]), float(r["ci_high"])
            ax.errorbar(ws, y, xerr=[[ws - lo], [hi - ws]], fmt="o", color=colors.get(arm.method, "black"),
                        capsize=3, markersize=5)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"judge: {judge}", fontsize=10)
        ax.set_xlabel("winning score vs full pool")
        ax.set_yticks(range(len(arms)), [a.name for a in arms], fontsize=8)
        ax.invert_yaxis()
    fig.suptitle("Subset models against the full-pool model (1 = as good; > 1 better)", fontsize=11)
    fig.tight_layout()
    return fig


def outcome_bars_figure(study: Study, table: list[dict]):
    """Win/tie/lose shares (all test sets) per subset model, one panel per judge: the paper's Figure 2 layout."""
    fig, axes, judges, arms = _judge_panels(study, table)
    for ax, judge in zip(axes[0], judges):
        rows = {r["model_a"]: r for r in table if r["judge"] == judge and r["test_set"] == "All"}
        outcome_bars(ax, [a.name for a in arms], [rows.get(a.name) for a in arms])
        ax.set_title(f"judge: {judge}", fontsize=10)
    axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=3, frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def training_figure(study: Study):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train import read_loss_csv

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for arm in study.arms:
        path = study.model_dir(arm) / "loss.csv"
        if not path.exists():
            continue
        rows = [r for r in read_loss_csv(path) if r.get("loss") is not None]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=arm.name,
                    linewidth=2.0 if arm.method in ("miwv", "full") else 0.9)
            drawn += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_xscale("log")
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig if drawn else None


def scores_figure(scores: list[dict]):
    from .plots import miwv_vs_ifd

    return miwv_vs_ifd(scores, spearman([s["miwv"] for s in scores], [s.get("ifd") for s in scores]))


def write_study_report(study: Study) -> Path:
    """``REPORT.md`` + figures + ``results.json`` in ``study.results_dir``; returns the report's path."""
    out = study.results_dir
    out.mkdir(parents=True, exist_ok=True)
    figures, table, comps = _figures_and_tables(study, out)
    scoring_text, scores = _scoring_section(study, figures)
    missing = _status(study)
    parts = [*_intro(study, missing),
             "## 1. Scoring", "", scoring_text, "",
             "## 2. Selected subsets", "", _selection_section(study, scores), "",
             "## 3. Fine-tuning", "", _training_section(study, figures), "",
             "## 4. Every subset model against the full-pool model", "",
             _evaluation_tables(study, table) if table else "Needs the judgements (stages `generate`, `judge`).", "",
             _answer_lengths(study)]
    if "winning" in figures:
        parts += ["", f"![winning scores]({figures['winning']})", "", f"![win/tie/lose]({figures['bars']})"]
    parts += _closing(study, comps)
    path = out / "REPORT.md"
    with atomic_open(path) as handle:
        handle.write("\n".join(parts) + "\n")
    write_json(out / "results.json", {"status_missing": missing, "comparisons": comps, "table": table,
                                      "figures": figures})
    return path


def _figures_and_tables(study: Study, out: Path) -> tuple[dict[str, str], list[dict], list[dict]]:
    """Draw the figures the run directory has data for; copy the judged table. Returns (figures, table, comparisons)."""
    figures: dict[str, str] = {}
    scores = read_jsonl(study.scores_path) if study.scores_path.exists() else None
    if scores:
        figures["scores"] = _save(scores_figure(scores), out / "miwv_vs_ifd.png")
    fig = training_figure(study)
    if fig is not None:
        figures["training"] = _save(fig, out / "training_loss.png")
    table_path = study.evaluation_dir / "table.csv"
    judgements_path = study.evaluation_dir / "judgements.jsonl"
    table = _read_csv(table_path) if table_path.exists() else []
    records = read_jsonl(judgements_path) if judgements_path.exists() else []
    if table:
        figures["winning"] = _save(winning_score_figure(study, table), out / "winning_scores.png")
        figures["bars"] = _save(outcome_bars_figure(study, table), out / "win_tie_lose.png")
        with atomic_open(out / "table.csv") as handle:
            handle.write(table_path.read_text(encoding="utf-8"))
    else:  # an earlier, judged report's files would otherwise sit beside a report that has no judgements
        for name in JUDGED_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return figures, table, comparisons(study, records) if records else []


def _intro(study: Study, missing: list[str]) -> list[str]:
    from .pipeline import repo_root

    c = study.config
    return [
        "# Small-scale reproduction of MIWV", "",
        f"*Generated by `miwv_lib/experiments/study_report.py` from the run directory; commit {_git_commit(repo_root()) or '?'}.*",
        "",
        "**Status: complete.**" if not missing else f"**Status: incomplete — still to run: {', '.join(missing)}.** "
        "The sections below show what exists so far.", "",
        "## The paper's claim", "",
        "MIWV (*Importance-Aware Data Selection for Efficient LLM Instruction Tuning*, AAAI-26) ranks instruction "
        "data by how much a similar example, placed before a sample as a one-shot demonstration, *hurts* the model's "
        "loss on that sample's response (MIWV = one-shot loss − zero-shot loss). The paper reports that fine-tuning "
        "LLaMA-2-7B on the top 1 % of Alpaca-52K by MIWV beats fine-tuning on all 52K rows under a GPT-4 pairwise "
        "judge on five test sets (winning score > 1), and beats IFD (Cherry) selection at the same size.", "",
        "## Our setting, and how it differs", "",
        c.description.strip() if c.description else "", "",
        _setting(study), "",
        "Winning score = 1 + (wins − losses) / N over prompts; each prompt is judged twice with the answers "
        "swapped, a prompt is a win if the model wins both orders or wins one and ties the other, a loss "
        "symmetrically, otherwise a tie (the paper's protocol). 95 % intervals: bootstrap over prompts.", ""]


def _closing(study: Study, comps: list[dict]) -> list[str]:
    c = study.config
    stages = ", ".join(f"`{s}`" for s in ("score", "select", "train", "generate", "judge", "report"))
    parts = ["", "## 5. What we can and cannot conclude", "", _conclusions(study, comps), "",
             "What this setting cannot show: the paper's judge is GPT-4 reading both answers; ours are reference-based "
             "proxies (likelihood of, and similarity to, the GPT-4 reference answer), which reward answers that look "
             f"like the reference, not answers a person prefers. The model is far smaller than the paper's 7B, "
             f"the pool is {len(study.pool):,} rows ({len(study.pool) / ALPACA_52K:.1%} of Alpaca-52K), and "
             "fine-tuning is on a CPU budget. A negative or null result here does not refute the paper at its "
             "scale; a positive one does not confirm it.",
             "", "## Reproduce", "", "```bash", f"python -m miwv_lib study --config {_from_repo(c.source)}", "```", "",
             "Each stage skips what is already done, so the same command continues an interrupted study; "
             f"`--stages` runs a subset of {stages}. "
             f"Intermediate files live in `{c.run_dir}` (not committed); `record/` beside this report keeps the "
             "small ones (scores, each model's manifest and loss curve, its answers as ids and text, no weights, no "
             "dataset text), so a fresh clone continues the study where the last commit left it."]
    per_stage: dict[str, float] = {}
    for t in _timings(study):
        per_stage[t["stage"]] = per_stage.get(t["stage"], 0.0) + t["seconds"]
    if per_stage:
        parts += ["", "Compute spent so far: " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in per_stage.items()) + "."]
    return parts
