"""The small-scale reproduction study: score → select → train → generate → judge → report, from one YAML file.

Every stage skips the work its files already hold, so a stopped study continues with the same command; the last
stage writes ``REPORT.md`` into a results directory meant to be committed.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from ..data.datasets import DEFAULT_DATASET, InstructionPool, load_instructions
from ..method.selection import BASELINE, Arm, plan_arms, select_arms
from ..runtime.io import atomic_open, read_jsonl, write_jsonl
from ..runtime.runs import FingerprintMismatch, now, read_yaml_mapping
from ..runtime.schema import check, each, integer, mapping, setting, text
from .engine import (
    ExperimentError,
    answer_arms,
    export_arms,
    is_trained,
    train_arms,
    warn_if_scored_otherwise,
    write_selections,
)
from .evaluate import cached_generations_for_model, compare_generations, load_test_pools, test_set_label
from .generate import GenerateConfig, generation_records, write_generations
from .judges import judge_rule
from .pipeline import repo_root, resolve_data_source, resolve_path, user_path
from .report import write_study_report
from .score import ScoreConfig, score_pool
from .select import load_checked_scores, method_rule, ratio_rule
from .train import TrainConfig, has_weights, trained_model_signature

STAGES = ("score", "select", "train", "generate", "judge", "report")
TIMINGS_FILE = "timings.jsonl"
StudyError = ExperimentError  # a study configuration or run directory that cannot be used, with the reason


@dataclass
class StudyConfig:
    description: str = setting("", rule=lambda v: None if isinstance(v, str) else f"expected text, got {v!r}")
    data: str = setting(DEFAULT_DATASET, rule=text())  # registry name, file or hub id of the instruction pool
    data_dir: str | None = setting(None, rule=text(optional=True))  # local mirror (default: $MIWV_DATA_DIR)
    limit: int | None = setting(None, rule=integer(2, optional=True))  # first N rows only (smoke runs)
    run_dir: str = setting("runs/small_scale", rule=text())  # scores, models, generations: large, not committed
    results_dir: str = setting("results/small_scale", rule=text())  # REPORT.md, tables, figures: committed
    ratios: list[float] = setting(default_factory=lambda: [0.05, 0.10], rule=each(ratio_rule))
    methods: list[str] = setting(default_factory=lambda: ["miwv", "ifd", "low-miwv", "random"], rule=each(method_rule))
    random_seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], rule=each(integer(0), nonempty=False))
    test_sets: dict[str, int | None] = setting(default_factory=lambda: {"alpaca_eval_gpt4": 200, "sinstruct": None},
                                               rule=mapping(text(), integer(1, optional=True), nonempty=True))
    test_seed: int = setting(0, rule=integer(0))  # which deterministic sample of a test set
    judges: list[str] = setting(default_factory=lambda: ["reference-nll", "embedding", "rougeL"], rule=each(judge_rule))
    n_bootstrap: int = setting(2000, rule=integer(100))
    score: dict[str, Any] = setting(default_factory=dict, rule=mapping(text()))  # ScoreConfig fields
    train: dict[str, Any] = setting(default_factory=dict, rule=mapping(text()))  # TrainConfig fields
    generate: dict[str, Any] = setting(default_factory=dict, rule=mapping(text()))  # GenerateConfig fields
    source: str = "<defaults>"  # where the configuration came from (for messages and the report)

    def __post_init__(self):
        check(self)

    def score_config(self) -> ScoreConfig:
        return _build(ScoreConfig, self.score, f"{self.source}: score")

    def train_config(self) -> TrainConfig:
        return _build(TrainConfig, self.train, f"{self.source}: train")

    def generate_config(self) -> GenerateConfig:
        trained = self.train_config().template
        if self.generate.get("template", trained) != trained:  # answers in a layout the models never learned
            raise StudyError(f"{self.source}: generate: template: {self.generate['template']!r} is not the models' "
                             f"training template {trained!r} (train.template); leave it out")
        return _build(GenerateConfig, {"template": trained} | self.generate, f"{self.source}: generate")

    def arms(self) -> list[Arm]:
        """Every subset model (each method at each ratio, each random seed), then the full-pool baseline."""
        return plan_arms(self.ratios, self.methods, self.random_seeds)


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    if unknown := sorted(set(values) - known):
        raise StudyError(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except ValueError as exc:  # a field's own check (ScoreConfig.max_length, say)
        raise StudyError(f"{where}: {exc}") from None


def load_study_config(path: str | Path | Mapping) -> StudyConfig:
    """A ``StudyConfig`` from a YAML file (or a mapping); unknown keys are errors that name the file."""
    raw, source = ((dict(path), "<dict>") if isinstance(path, Mapping)
                   else (read_yaml_mapping(user_path(path), path, StudyError), str(path)))
    config = _build(StudyConfig, {**raw, "source": source}, source)
    if "random" in config.methods and not config.random_seeds:
        raise StudyError(f"{config.source}: method 'random' needs at least one of random_seeds")
    config.score_config(), config.train_config(), config.generate_config()  # unknown keys fail now, not hours later
    return config


@dataclass
class Study:
    """A study configuration bound to its run and results directories."""

    config: StudyConfig
    run_dir: Path
    results_dir: Path
    arms: list[Arm] = field(default_factory=list)

    def __post_init__(self):
        self.scores_dir = self.run_dir / "scores"
        self.scores_path = self.scores_dir / "scores.jsonl"
        self.generations_dir = self.run_dir / "generations"
        self.evaluation_dir = self.run_dir / "evaluation"
        self.record = StudyRecord(self.results_dir / "record", self.run_dir)  # committed: see StudyRecord

    @classmethod
    def from_config(cls, config: StudyConfig, run_dir: str | Path | None = None,
                    results_dir: str | Path | None = None) -> Study:
        # a run directory of one's own gets its results beside it, not over the configuration's (committed) ones
        results_dir = results_dir or (Path(run_dir) / "results" if run_dir else config.results_dir)
        return cls(config=config, run_dir=resolve_path(run_dir or config.run_dir),
                   results_dir=resolve_path(results_dir), arms=config.arms())

    def model_dir(self, arm: Arm) -> Path:
        return self.run_dir / "models" / arm.name

    @cached_property
    def pool(self) -> InstructionPool:
        return load_instructions(resolve_data_source(self.config.data), data_dir=self.config.data_dir,
                                 limit=self.config.limit)

    def scores(self) -> list[dict]:
        if not self.scores_path.exists():
            raise StudyError(f"{self.scores_path} does not exist: run the 'score' stage first")
        return load_checked_scores(self.pool, self.scores_path)

    def _log_time(self, stage: str, seconds: float, **extra) -> None:
        """Log a piece of finished work, and record it (a stopped study resumes from its record)."""
        path = self.run_dir / TIMINGS_FILE
        done = read_jsonl(path) if path.exists() else []
        write_jsonl(path, [*done, {"stage": stage, "seconds": round(seconds, 2), "finished": now(), **extra}])
        self.record.keep()

    def score(self) -> list[dict]:
        manifest_path = self.scores_dir / "manifest.json"
        before = manifest_path.read_text(encoding="utf-8") if manifest_path.exists() else None
        t0 = time.perf_counter()
        scores = score_pool(self.pool, self.scores_dir, self.config.score_config())
        if (after := manifest_path.read_text(encoding="utf-8")) != before:  # scored now, not a finished run read back
            manifest = json.loads(after)
            self._log_time("score", time.perf_counter() - t0, rows=manifest["rows_scored_this_run"],
                           seconds_scoring=manifest.get("seconds_scoring"))
        return scores

    def selections(self, scores: list[dict] | None = None) -> dict[str, list[int]]:
        return select_arms(self.arms, scores if scores is not None else self.scores())

    def select(self) -> dict[str, list[int]]:
        scores = self.scores()
        plan = self.selections(scores)
        export_arms(self.pool, scores, self.arms, plan, self.run_dir / "subsets")
        write_selections(self.run_dir, self.arms, plan)
        return plan

    def train(self, only: Sequence[str] | None = None) -> dict[str, Any]:
        def trained(arm: Arm, result, seconds: float) -> None:
            self._log_time("train", seconds, model=arm.name, rows=result.n_examples, steps=result.steps)

        config = self.config.train_config()
        warn_if_scored_otherwise(self.scores_path, config)
        return train_arms(self._chosen(only), self.selections(), self.pool, self.run_dir / "models", config,
                          on_trained=trained)

    def _chosen(self, only: Sequence[str] | None) -> list[Arm]:
        if not only:
            return list(self.arms)
        if unknown := sorted(set(only) - {a.name for a in self.arms}):
            raise StudyError(f"unknown models {unknown}; this study has: {', '.join(a.name for a in self.arms)}")
        return [a for a in self.arms if a.name in set(only)]

    def is_trained(self, arm: Arm) -> bool:
        return is_trained(self.model_dir(arm))

    def is_answered(self, arm: Arm) -> bool:
        """Its answers are on disk and are this configuration's (test samples, generation settings): an edited
        test_seed used to report the old sample's answers under the new seed."""
        if not (self.is_trained(arm) and all((self.generations_dir / arm.name / f"{d}.jsonl").exists()
                                             for d in self.test_set_labels)):
            return False
        identity, dtype = trained_model_signature(self.model_dir(arm))
        answers = cached_generations_for_model(identity, dtype, arm.name, self.test_pools, self.generations_dir,
                                               self.config.generate_config(), self.config.score_config().max_length)
        return answers is not None

    def _drop_unanswered(self, restored: list[str]) -> None:
        """A model restored without weights whose recorded answers do not apply here (another test sample, other
        generation settings) is trained again, rather than stopping the generate stage."""
        for arm in self.arms:
            model_dir = self.model_dir(arm)
            if (str(Path("models", arm.name, "manifest.json")) in restored and not has_weights(model_dir)
                    and not self.is_answered(arm)):
                shutil.rmtree(model_dir)

    @cached_property
    def test_pools(self) -> dict[str, InstructionPool]:
        return load_test_pools({resolve_data_source(name): n for name, n in self.config.test_sets.items()},
                               seed=self.config.test_seed, data_dir=self.config.data_dir)

    @property
    def test_set_labels(self) -> list[str]:
        return [test_set_label(name) for name in self.config.test_sets]

    def generate(self, only: Sequence[str] | None = None) -> dict[str, list[dict]]:
        return answer_arms([a.name for a in self._chosen(only)], self.run_dir / "models", self.test_pools,
                           self.generations_dir, self.config.generate_config(),
                           nll_max_length=self.config.score_config().max_length,
                           device=self.config.train_config().device,
                           on_answered=lambda name, seconds: self._log_time("generate", seconds, model=name))

    def judge(self) -> list[dict]:
        """Every trained model against the full-pool one; a study still training is judged so far."""
        ready = [a.name for a in self.arms if self.is_trained(a)]
        if BASELINE not in ready:
            raise StudyError(f"the full-pool model is not trained yet, and every model is judged against it: "
                             f"run '--stages train generate --models {BASELINE}' first")
        if waiting := [a.name for a in self.arms if a.name not in ready]:  # judging is cheap and cached
            print(f"[study] judging {len(ready) - 1} of {len(self.arms) - 1} models; not trained yet: "
                  f"{', '.join(waiting)}", flush=True)
        # Through the generate stage, not straight from the files: it checks every file's fingerprint
        # against its model, so a retrained model can never be judged on its predecessor's answers.
        generations = self.generate(ready)
        verdicts = self.evaluation_dir / "judgements.jsonl"
        before = verdicts.read_bytes() if verdicts.exists() else None
        t0 = time.perf_counter()
        result = compare_generations(generations, BASELINE, self.config.judges, self.evaluation_dir,
                                     datasets=self.test_set_labels, n_resamples=self.config.n_bootstrap)
        if verdicts.read_bytes() != before:  # the verdicts changed: this was judging, not a re-read
            self._log_time("judge", time.perf_counter() - t0, records=len(result.records))
        return result.table

    def report(self) -> Path:
        return write_study_report(self, repo_root())

    def run(self, stages: Sequence[str] = STAGES, only: Sequence[str] | None = None) -> None:
        if unknown := [s for s in stages if s not in STAGES]:
            raise StudyError(f"unknown stages {unknown}; the stages are {', '.join(STAGES)}")
        actions = {"score": self.score, "select": self.select, "train": lambda: self.train(only),
                   "generate": lambda: self.generate(only), "judge": self.judge, "report": self.report}
        if {"generate", "judge"} & set(stages):  # a missing test set is found now, not after scoring and training
            self.test_pools  # noqa: B018 (loaded, and kept, for its errors)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        restored = self.record.restore(self.arms, self.test_set_labels)
        if answered := [a.name for a in self.arms if (self.record.root / "generations" / a.name).is_dir()]:
            self.record.restore_generations(answered, self.test_pools)  # now: the report counts them in any stage
            self._drop_unanswered(restored)
        try:
            for stage in [s for s in STAGES if s in stages]:  # always in the study's order, whatever order given
                print(f"[study] {stage}", flush=True)
                actions[stage]()
                self.record.keep()
        except FingerprintMismatch as exc:  # no --overwrite here: the record would restore those files anyway
            raise StudyError(f"{str(exc).partition('. Use another')[0]}; the record {self.record.root} keeps them: "
                             "run the study with a --run-dir and a --results-dir of its own") from None
        finally:  # a stopped run (Ctrl-C, an error) still records what it finished: scores resume by chunk
            self.record.keep()


@dataclass
class StudyRecord:
    """The small files of a study's run directory (scores, model manifests and loss curves, answers as
    ``{"id", "output"}``), kept beside its report to be committed, so a fresh checkout continues the study.
    Weights are not kept: a model is restored only together with all its answers, so nothing later needs it."""

    root: Path  # results_dir/record
    run_dir: Path

    FILES = ("scores/manifest.json", "scores/scores.jsonl", "scores/scores.partial*.jsonl", "scores/neighbors.json",
             "subsets/selections.json", TIMINGS_FILE)
    MODEL_FILES = ("manifest.json", "train_config.json", "loss.csv")
    GENERATION_SUFFIXES = (".meta.json", ".reference_nll.json")  # per test set, copied as they are

    def keep(self) -> None:
        """Copy the run directory's small files into the record (finished models only)."""
        small = [path.relative_to(self.run_dir) for pattern in self.FILES for path in self.run_dir.glob(pattern)]
        for model in filter(is_trained, self.run_dir.glob("models/*")):
            small += [Path("models", model.name, name) for name in self.MODEL_FILES]
        for path in small:
            _copy(self.run_dir / path, self.root / path)
        if (self.run_dir / "scores" / "scores.jsonl").exists():  # finished: its chunks are in scores.jsonl now
            for stale in self.root.glob("scores/scores.partial*.jsonl"):
                stale.unlink()
        for meta in self.run_dir.glob("generations/*/*.meta.json"):  # finished answers, kept as {"id", "output"}
            source, dataset = meta.parent, meta.name.removesuffix(".meta.json")
            target = self.root / "generations" / source.name
            if not (source / f"{dataset}.jsonl").exists():
                continue
            for name in (f"{dataset}{suffix}" for suffix in self.GENERATION_SUFFIXES):
                _copy(source / name, target / name)
            answers = [{"id": r["id"], "output": r["output"]} for r in read_jsonl(source / f"{dataset}.jsonl")]
            outputs = target / f"{dataset}.outputs.jsonl"
            if not outputs.exists() or read_jsonl(outputs) != answers:
                write_jsonl(outputs, answers)

    def restore(self, arms: Sequence[Arm], datasets: Sequence[str]) -> list[str]:
        """Copy recorded files that the run directory lacks (its own files are the newer work) into it; a model's
        files only if its answers on every test set are recorded too. Returns what was restored."""
        wanted = [path.relative_to(self.root) for pattern in self.FILES for path in self.root.glob(pattern)]
        for arm in arms:
            recorded = self.root / "generations" / arm.name
            if all((recorded / f"{d}{suffix}").exists() for d in datasets
                   for suffix in (".outputs.jsonl", *self.GENERATION_SUFFIXES)):
                wanted += [Path("models", arm.name, name) for name in self.MODEL_FILES]
        restored = [str(path) for path in wanted if _copy(self.root / path, self.run_dir / path, overwrite=False)]
        if restored:
            print(f"[study] restored {len(restored)} files from {self.root}", flush=True)
        return restored

    def restore_generations(self, models: Sequence[str], pools: Mapping[str, InstructionPool]) -> None:
        """Rebuild models' generation files from their recorded answers and the test sets themselves."""
        for model, (dataset, pool) in itertools.product(models, pools.items()):
            recorded, target = self.root / "generations" / model, self.run_dir / "generations" / model
            answers_path = recorded / f"{dataset}.outputs.jsonl"
            if (target / f"{dataset}.jsonl").exists() or not answers_path.exists():
                continue
            answers = read_jsonl(answers_path)
            if [a["id"] for a in answers] != [row["id"] for row in pool.rows]:
                continue  # another sample of the test set: these answers do not apply, generate anew
            write_generations(target, generation_records(pool, [a["output"] for a in answers], model, dataset),
                              stem=dataset)
            for suffix in self.GENERATION_SUFFIXES:  # the recorded answers' own meta, over any stale one
                _copy(recorded / f"{dataset}{suffix}", target / f"{dataset}{suffix}")


def _copy(source: Path, target: Path, *, overwrite: bool = True) -> bool:
    """Copy ``source`` atomically, if there is one, over a ``target`` that differs (or only to a missing one)."""
    if not source.exists() or (target.exists() and (not overwrite or target.read_bytes() == source.read_bytes())):
        return False
    with atomic_open(target, "wb") as handle:
        handle.write(source.read_bytes())
    return True


def run_study(config: str | Path | Mapping | StudyConfig, run_dir: str | Path | None = None,
              results_dir: str | Path | None = None, stages: Sequence[str] = STAGES,
              only: Sequence[str] | None = None) -> Study:
    """Run (or continue) the study's ``stages``; returns the ``Study`` for inspection."""
    if not isinstance(config, StudyConfig):
        config = load_study_config(config)
    study = Study.from_config(config, run_dir, results_dir)
    study.run(stages, only)
    return study
