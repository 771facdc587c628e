"""The experiment engine: one model per arm, fine-tuned, asked the test prompts, judged against the full pool.
Notebooks 04-05, ``evaluate`` and ``study`` all run these functions, so every path names, trains and judges a model
alike; each stage skips what its files already hold, so running it again continues where it stopped. A run directory
holds ``subsets/selections.json``, ``models/<arm>/``, ``generations/<arm>/`` and ``evaluation/``."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from ..data.datasets import InstructionPool, load_instructions
from ..method.pairwise import Judge
from ..method.selection import BASELINE, Arm, SelectionError, demo_trimmed, plan_arms, select_arms
from ..runtime.io import file_sha256, write_json
from ..runtime.runs import FingerprintMismatch
from .evaluate import (
    DEFAULT_TEST_SETS,
    ComparisonResult,
    cached_generations_for_model,
    compare_generations,
    generate_for_model,
    load_test_pools,
)
from .generate import GenerateConfig
from .judges import OFFLINE_JUDGES
from .select import SELECTIONS_FILE, export_subset, load_checked_scores, ratio_rule
from .train import TrainConfig, TrainResult, has_weights, load_trained, train_model, trained_model_signature


class ExperimentError(ValueError):
    """A stage that cannot run yet (a model not trained, answers without weights), with what to do."""


def warn_if_scored_otherwise(scores_path: str | Path, config: TrainConfig) -> None:
    """MIWV ranks the weaknesses of the model that scored, in its template: say so when training uses another."""
    try:
        scored = json.loads((Path(scores_path).parent / "manifest.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest: 'select' has already warned that only the ids can be checked
    if differs := [f"{key} {scored[key]!r} (training: {getattr(config, key)!r})" for key in ("model", "template")
                   if key in scored and scored[key] != getattr(config, key)]:
        warnings.warn(f"{scores_path} was scored with {' and '.join(differs)}: a selection by MIWV then ranks the "
                      "weaknesses of another model or prompt layout than the one trained", stacklevel=2)


def write_selections(run_dir: Path, arms: Sequence[Arm], plan: dict[str, list[int]]) -> Path:
    """The arms of a run and each subset's rows (the full pool's are all rows, so not listed)."""
    return write_json(Path(run_dir) / SELECTIONS_FILE, {
        "arms": [asdict(a) for a in arms], "indices": {k: v for k, v in plan.items() if k != BASELINE}})


def export_arms(pool: InstructionPool, scores: list[dict], arms: Sequence[Arm], plan: dict[str, list[int]],
                subsets_dir: Path) -> list[dict]:
    """Write every selected arm's subset to ``subsets_dir/<arm>.json``; returns what was written, with sha256s."""
    entries = []
    for arm in [a for a in arms if a.method != BASELINE]:
        rows = plan[arm.name]
        path = export_subset(pool, scores, rows, Path(subsets_dir) / f"{arm.name}.json", by=arm.method)
        entries.append({"name": arm.name, "method": arm.method, "ratio": arm.ratio, "seed": arm.seed,
                        "rows": len(rows), "file": path.name, "sha256": file_sha256(path),
                        "demo_trimmed": demo_trimmed([scores[i] for i in rows])})
    return entries


def read_arms(run_dir: Path) -> list[Arm]:
    path = Path(run_dir) / SELECTIONS_FILE
    if not path.is_file():
        raise ExperimentError(f"{path} not found: select and train the models first (notebook 04, or 'train')")
    return [Arm(**arm) for arm in json.loads(path.read_text(encoding="utf-8"))["arms"]]


def is_trained(model_dir: Path) -> bool:
    """Its training finished (a run cut off mid-way leaves a manifest with another status)."""
    manifest = Path(model_dir) / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text(encoding="utf-8")).get("status") == "complete"


def _made_by_an_earlier_rule(model_dir: Path, mismatch: FingerprintMismatch) -> bool:
    """A finished model without weights (a study's record restored it) that differs from today's in no setting and
    not in its base model: today's code trains it otherwise (before 2026-12-05 a long row lost its prompt's start).
    Nothing is lost by training it again; a changed setting or base model still stops the stage, so that no edit
    replaces a record unasked."""
    return (bool(mismatch.changed) and not any(k.startswith(("config.", "base_model")) for k in mismatch.changed)
            and is_trained(model_dir) and not has_weights(model_dir))


def train_arms(arms: Sequence[Arm], plan: dict[str, list[int]], pool: InstructionPool, models_dir: Path,
               config: TrainConfig, *, overwrite: bool = False,
               on_trained: Callable[[Arm, TrainResult, float], None] | None = None) -> dict[str, TrainResult]:
    """Fine-tune one model per arm on its rows, all with ``config``; a model already trained so is reused."""
    results = {}
    for arm in arms:
        t0, model_dir, rows = time.perf_counter(), Path(models_dir) / arm.name, [pool.rows[i] for i in plan[arm.name]]
        try:  # each model loads a fresh base (seconds), so no run can leak into the next one
            result = train_model(rows, model_dir, config, name=arm.name, overwrite=overwrite)
        except FingerprintMismatch as exc:
            if not _made_by_an_earlier_rule(model_dir, exc):
                raise
            result = train_model(rows, model_dir, config, name=arm.name, overwrite=True)
        results[arm.name] = result
        if on_trained is not None and not result.skipped:
            on_trained(arm, result, time.perf_counter() - t0)
    return results


def answer_arms(names: Sequence[str], models_dir: Path, pools: dict[str, InstructionPool], generations_dir: Path,
                config: GenerateConfig, *, nll_max_length: int | str = 1024, device: str = "auto",
                on_answered: Callable[[str, float], None] | None = None) -> dict[str, list[dict]]:
    """Each trained model's answers to every test prompt (and the reference answers' NLL under it); answers on
    disk whose key matches the model and settings are read back without loading the model."""
    if missing := [name for name in names if not is_trained(Path(models_dir) / name)]:
        raise ExperimentError(f"not trained yet: {', '.join(missing)}: train them first")
    answers = {}
    for name in names:
        model_dir = Path(models_dir) / name
        identity, dtype = trained_model_signature(model_dir)
        cached = cached_generations_for_model(identity, dtype, name, pools, generations_dir, config, nll_max_length)
        if cached is not None:
            answers[name] = cached
            continue
        if not has_weights(model_dir):
            raise ExperimentError(
                f"{name}: its answers are missing or out of date, and its weights are not in {model_dir} (a checkout "
                f"keeps only each model's record): delete {model_dir} and train it again")
        t0 = time.perf_counter()
        answers[name] = generate_for_model(load_trained(model_dir, device=device), name, pools, generations_dir,
                                           config, nll_max_length=nll_max_length)
        if on_answered is not None:
            on_answered(name, time.perf_counter() - t0)
    return answers


def run_comparison(run_dir: str | Path, pool: InstructionPool | str | Path, ratio: float = 0.05, *,
                   methods: tuple[str, ...] = ("miwv", "random"), train_config: TrainConfig | None = None,
                   generate_config: GenerateConfig | None = None, test_sets: Sequence[str] = DEFAULT_TEST_SETS,
                   sample: int | None = None, sample_seed: int = 0, data_dir: str | Path | None = None,
                   judges: Sequence[Judge | str] = OFFLINE_JUDGES, selection_seed: int = 0,
                   n_resamples: int = 2000, bootstrap_seed: int = 0, overwrite: bool = False) -> ComparisonResult:
    """The ``evaluate`` command: from ``run_dir/scores.jsonl``, the top r % by each method and the full pool,
    fine-tuned alike, compared with the full-pool model. The offline judges need reference answers (Self-Instruct,
    AlpacaEval); pass ``judges=["hf:<model>"]`` or ``["openai:<model>"]`` for an LLM judge."""
    run_dir = Path(run_dir)
    pool = pool if isinstance(pool, InstructionPool) else load_instructions(pool, data_dir=data_dir)
    scores = load_checked_scores(pool, run_dir / "scores.jsonl")
    train_config = train_config or TrainConfig()
    warn_if_scored_otherwise(run_dir / "scores.jsonl", train_config)
    generate_config = generate_config or GenerateConfig(template=train_config.template)
    pools = load_test_pools(test_sets, sample, sample_seed, data_dir)  # a bad test set is an error before training
    if problem := ratio_rule(ratio):  # 1 would compare the full-pool model with itself
        raise SelectionError(f"ratio: {problem}")
    if all(j in OFFLINE_JUDGES if isinstance(j, str) else j.needs_reference for j in judges) and (
            unjudged := [name for name, p in pools.items() if not any(p.references)]):
        warnings.warn(f"{', '.join(unjudged)}: no reference answers, so these answers are generated (and exported "
                      "for an external judge) but not judged here; add an LLM judge (--judge hf:… or openai:…) to "
                      "judge them", stacklevel=2)
    arms = plan_arms([ratio], methods, [selection_seed])
    plan = select_arms(arms, scores)
    write_selections(run_dir, arms, plan)
    models = train_arms(arms, plan, pool, run_dir / "models", train_config, overwrite=overwrite)
    answers = answer_arms([a.name for a in arms], run_dir / "models", pools, run_dir / "generations", generate_config,
                          device=train_config.device)
    comparison = compare_generations(answers, BASELINE, judges, run_dir / "evaluation", datasets=list(pools),
                                     n_resamples=n_resamples, seed=bootstrap_seed)
    comparison.models = models
    return comparison
