"""Command line: ``python -m miwv_lib score|select|pipeline|study|train|evaluate`` (also installed as ``miwv``).

The flags are a contract used by people and scripts; add new ones, don't rename old ones.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from ..data.datasets import DataError, load_instructions
from ..data.models import EmbedderError, ModelLoadError, check_embedder, resolve_device
from ..data.prompts import TemplateError
from ..method.selection import (
    RANKED_BY,
    SELECTION_METHODS,
    SelectionError,
    demo_trimmed,
    score_warnings,
    select_indices,
)
from ..runtime.distributed import DistributedSetupError
from ..runtime.io import keep_interrupts
from ..runtime.runs import FingerprintMismatch, RunDirectoryBusy, run_lock
from ..runtime.schema import add_flags, from_args
from .engine import run_comparison, warn_if_scored_otherwise
from .evaluate import DEFAULT_TEST_SETS
from .generate import GenerateConfig
from .judges import OFFLINE_JUDGES, judge_rule, make_judge
from .pipeline import PipelineError, publish_run, resolve_data_source, resolve_path, run_pipeline
from .score import PARTIAL_FILE, ScoreConfig, is_run_file, score_pool
from .select import export_subset, load_checked_scores, subset_format
from .study import STAGES, StudyError, load_study_config, run_study
from .train import TrainConfig, train_model

TRAIN = "train_"  # the training flags' dest prefix: 'train' and 'evaluate' have a selection --seed of their own


def _checked(parse, ok, wording: str):
    """An argparse type: ``parse(text)`` if ``ok`` says it is fine, else a usage error quoting the text."""
    def convert(text: str):
        with contextlib.suppress(ValueError):
            if ok(value := parse(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}")

    return convert


_positive_int = _checked(int, lambda n: n >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda n: n >= 0, "an integer ≥ 0")
_path = _checked(str, str.strip, "a path")
_judge = _checked(str, lambda spec: judge_rule(spec) is None,
                  f"one of {', '.join(OFFLINE_JUDGES)}, hf:<model> or openai:<model>")


class _Parser(argparse.ArgumentParser):
    """A usage error is one ``error:`` line (like every other error), naming the flag and where help is."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=_path,
                        help="file (.json/.jsonl/.parquet), registry name or hub id; default: 'alpaca' "
                             "from the data directory, else the hub")
    parser.add_argument("--data-dir", type=_path, help="local data mirror (default: $MIWV_DATA_DIR)")
    parser.add_argument("--limit", type=_positive_int, help="use only the first N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miwv", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="compute MIWV (and IFD) for every row")
    _add_data_args(score)
    score.add_argument("--out", required=True, type=_path, help="run directory for scores.jsonl and manifest.json")
    add_flags(score, ScoreConfig)  # --model, --embedder, --template, --max-length, --dtype, --batch-size, --no-ifd…
    score.add_argument("--overwrite", action="store_true", help="replace results of a different configuration")

    select = commands.add_parser("select", help="write the top floor(ratio·N) rows")
    _add_data_args(select)
    select.add_argument("--scores", required=True, type=_path, help="scores.jsonl written by 'score'")
    select.add_argument("--ratio", type=float, required=True, help="fraction of rows to keep, e.g. 0.01")
    select.add_argument("--by", choices=SELECTION_METHODS, default="miwv")
    select.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random baseline")
    select.add_argument("--out", required=True, type=_path, help="subset file (.json or .jsonl)")

    pipeline = commands.add_parser("pipeline", help="run the notebooks in order with papermill, then write report.md")
    pipeline.add_argument("--config", required=True, type=_path, help="YAML configuration, e.g. configs/demo.yaml")
    pipeline.add_argument("--run-dir", type=_path,
                          help="output directory (relative to the current directory); default: the config's run_dir")
    pipeline.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a parameter (YAML value); NN_name.KEY=VALUE for one notebook; repeatable")
    pipeline.add_argument("--notebooks", nargs="+", metavar="NAME",
                          help="run only these notebooks (e.g. 03_selection or 03)")
    pipeline.add_argument("--no-progress", action="store_true", help="no progress bars")
    pipeline.add_argument("--publish", type=_path, metavar="DIR",
                          help="then copy the executed notebooks, report.md and figures into DIR (e.g. results/demo)")

    study = commands.add_parser("study", help="the reproduction study: score, select, train, generate, judge, report")
    study.add_argument("--config", required=True, type=_path,
                       help="YAML study configuration, e.g. configs/study/small_scale.yaml")
    study.add_argument("--run-dir", type=_path, help="intermediate files (default: the config's run_dir)")
    study.add_argument("--results-dir", type=_path,
                       help="REPORT.md and figures (default: RUN_DIR/results with --run-dir, else the config's)")
    study.add_argument("--stages", nargs="+", metavar="STAGE",
                       help="run only these stages (score select train generate judge report); default: all")
    study.add_argument("--models", nargs="+", metavar="NAME",
                       help="train/generate only these models (e.g. full miwv_5pct), to split the work")
    _add_train_commands(commands)
    return parser


def _add_train_commands(commands) -> None:
    train = commands.add_parser("train", help="fine-tune (LoRA) on the pool or on a selected subset of it")
    evaluate = commands.add_parser(
        "evaluate", help="train MIWV-top, random and full-pool models and compare them pairwise on the test sets")
    for parser in (train, evaluate):
        _add_data_args(parser)
        add_flags(parser, TrainConfig, prefix=TRAIN)  # --model, --epochs, --lora-r, --train-seed, ... (dest: train_*)
        parser.add_argument("--overwrite", action="store_true", help="replace a model trained with other settings")
    train.add_argument("--out", required=True, type=_path,
                       help="model directory (adapter, train_config.json, loss.csv)")
    train.add_argument("--scores", type=_path, help="scores.jsonl: train on a selection instead of all rows")
    train.add_argument("--ratio", type=float, help="with --scores: fraction of rows to keep")
    train.add_argument("--by", choices=SELECTION_METHODS, default="miwv")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random baseline")

    evaluate.add_argument("--run-dir", required=True, type=_path, help="run directory holding scores.jsonl for --data")
    evaluate.add_argument("--ratio", type=float, required=True, help="fraction of rows each selected model gets")
    evaluate.add_argument("--methods", nargs="+", choices=SELECTION_METHODS, default=["miwv", "random"])
    evaluate.add_argument("--test-sets", nargs="+", default=list(DEFAULT_TEST_SETS))
    evaluate.add_argument("--sample", type=_positive_int, help="prompts per test set (seeded sample)")
    evaluate.add_argument("--sample-seed", type=_non_negative_int, default=0)
    add_flags(evaluate, GenerateConfig, only=["max_new_tokens"])
    evaluate.add_argument("--judge", action="append", metavar="SPEC", type=_judge,
                          help=f"repeatable: {', '.join(OFFLINE_JUDGES)} (default: all three), "
                               "hf:<model> or openai:<model>")
    evaluate.add_argument("--judge-base-url", default="https://api.openai.com/v1", help="for openai:<model>")
    evaluate.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                          help="environment variable holding the judge's API key (for openai:<model>)")


def _load_pool(args: argparse.Namespace):
    try:
        return load_instructions(resolve_data_source(args.data), data_dir=args.data_dir, limit=args.limit)
    except RecursionError:  # json gives up on very deep nesting
        raise DataError("JSON nested too deeply to be a list of records", source=str(args.data)) from None


def run_score(args: argparse.Namespace) -> None:
    pool = _load_pool(args)
    if len(pool) < 2:  # checked before the model is loaded: nothing to pair a lone sample with
        raise DataError(f"MIWV needs at least 2 rows (each row's demonstration is its nearest other row); "
                        f"got {len(pool)}", source=pool.source)
    _check_device(args.device)
    config = from_args(ScoreConfig, args)
    if (out := Path(args.out)).exists() and not out.is_dir():
        raise DataError("--out must be a run directory, but this is a file", source=str(out))
    if args.data and is_run_file(args.data, out):  # no --data: the default dataset
        raise DataError(f"--data is a file the run in {out} writes; refusing to overwrite an input", source=args.data)
    check_embedder(config.embedder)  # before the scoring model loads, not after
    scores = score_pool(pool, out, config, overwrite=args.overwrite)  # it locks the run directory
    miwvs = sorted(s["miwv"] for s in scores if s["miwv"] is not None)
    summary = (f"MIWV min {miwvs[0]:+.3f}, median {miwvs[len(miwvs) // 2]:+.3f}, max {miwvs[-1]:+.3f}" if miwvs
               else "no finite MIWV")
    print(f"scored {len(scores)} rows -> {out / 'scores.jsonl'}; {summary}")
    for line in score_warnings(scores):
        print(f"warning: {line}", file=sys.stderr)


def _check_device(device: str) -> None:
    resolve_device(device, setting="--device")  # before a run directory is touched


def run_select(args: argparse.Namespace) -> None:
    try:
        subset_format(args.out)  # before any work: the name decides the format
    except SelectionError as exc:
        raise SelectionError(f"--out {exc}") from None
    pool = _load_pool(args)
    for given, role in ((args.data, "--data"), (args.scores, "--scores")):
        if given and Path(given).exists() and Path(args.out).resolve() == Path(given).resolve():
            raise SelectionError(f"--out {args.out} is the {role} file; refusing to overwrite an input")
    if is_run_file(args.out, Path(args.scores).parent):
        raise SelectionError(f"--out {args.out} is a file of the run that {args.scores} comes from; refusing to "
                             "overwrite it")
    scores = load_checked_scores(pool, args.scores)
    indices = select_indices(scores, args.ratio, by=args.by, seed=args.seed)
    out = export_subset(pool, scores, indices, args.out, by=args.by)
    print(f"selected {len(indices)} of {len(pool)} rows by {args.by} -> {out}")
    if RANKED_BY.get(args.by, ("",))[0] == "miwv" and (trimmed := demo_trimmed([scores[i] for i in indices])):
        print(f"warning: {trimmed} of the {len(indices)} selected rows had their demonstration trimmed by "
              "--max-length (a trimmed demo helps less, which raises MIWV); score again with --max-length auto",
              file=sys.stderr)


def run_pipeline_command(args: argparse.Namespace) -> None:
    logging.getLogger("papermill").setLevel(logging.WARNING)  # its per-notebook INFO lines break the progress bars
    run_dir = Path(os.path.expanduser(args.run_dir)).resolve() if args.run_dir else None
    t0 = time.perf_counter()
    result = run_pipeline(args.config, run_dir=run_dir, notebooks=args.notebooks, overrides=args.overrides,
                          progress=not args.no_progress)
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
    print(f"ran {len(result.executed)} notebooks in {time.perf_counter() - t0:.0f} s ({times}) -> "
          f"{result.run_dir / 'notebooks'}")
    if result.report:
        print(f"report: {result.report}")
    if args.publish:
        print(f"published {len(publish_run(result.run_dir, args.publish))} files to {args.publish}")


def run_study_command(args: argparse.Namespace) -> None:
    # Directories given on the command line are relative to where it runs; those in the config, to the repository.
    run_dir, results_dir = (Path(os.path.expanduser(d)).resolve() if d else None
                            for d in (args.run_dir, args.results_dir))
    with run_lock(run_dir or resolve_path(load_study_config(args.config).run_dir)):
        study = run_study(args.config, run_dir=run_dir, results_dir=results_dir, stages=args.stages or STAGES,
                          only=args.models)
    if (report := study.results_dir / "REPORT.md").exists():
        print(f"report: {report}")


def run_train(args: argparse.Namespace) -> None:
    pool = _load_pool(args)
    rows = pool.rows
    if args.ratio is not None and not args.scores:
        raise SelectionError("--ratio selects rows by their scores: give --scores too (or leave --ratio out to train "
                             "on every row)")
    if args.scores:
        if args.ratio is None:
            raise SelectionError("--scores needs --ratio (the fraction of rows to train on)")
        scores = load_checked_scores(pool, args.scores)
        rows = [pool.rows[i] for i in select_indices(scores, args.ratio, by=args.by, seed=args.seed)]
    config = from_args(TrainConfig, args, prefix=TRAIN)
    if args.scores:
        warn_if_scored_otherwise(args.scores, config)
    _check_device(config.device)
    result = train_model(rows, args.out, config, overwrite=args.overwrite)
    state = ("already trained" if result.skipped
             else f"trained {result.steps} steps, {result.tokens_per_second} tokens/s")
    print(f"{state} on {result.n_examples} rows, mean training loss over all steps {result.train_loss:.4f} "
          f"-> {result.model_dir}")


def run_evaluate(args: argparse.Namespace) -> None:
    pool = _load_pool(args)
    config = from_args(TrainConfig, args, prefix=TRAIN)
    _check_device(config.device)
    judges = [make_judge(spec, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env)
              if spec.startswith("openai:") else spec for spec in (args.judge or OFFLINE_JUDGES)]
    result = run_comparison(args.run_dir, pool, args.ratio, methods=tuple(args.methods), train_config=config,
                            generate_config=from_args(GenerateConfig, args, template=config.template),
                            test_sets=[resolve_data_source(name) for name in args.test_sets], sample=args.sample,
                            sample_seed=args.sample_seed, data_dir=args.data_dir, judges=judges,
                            overwrite=args.overwrite)
    print(Path(result.paths["markdown"]).read_text(encoding="utf-8"))
    print(f"tables and figure -> {result.run_dir}")


_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space (or write elsewhere) and run the same command again: finished work is kept",
    errno.EROFS: "write somewhere writable (another --out or --run-dir)",
    errno.EACCES: "write somewhere writable (another --out or --run-dir), or fix the permissions",
    errno.EEXIST: "this is a file where a directory is needed (--out or --run-dir): name another place",
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line, like an error (not Python's two lines with the source of the call)."""
    print(f"warning: {category.__name__}: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    keep_interrupts()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        {"score": run_score, "select": run_select, "pipeline": run_pipeline_command, "train": run_train,
         "evaluate": run_evaluate, "study": run_study_command}[args.command](args)
    except (DataError, ModelLoadError, SelectionError, FingerprintMismatch, RunDirectoryBusy, PipelineError,
            StudyError, EmbedderError, DistributedSetupError, TemplateError,
            OSError) as exc:  # OSError: a missing path, a full disk
        # One line; an OSError names its file first (/run/scores.jsonl: No space left on device) and, where the
        # remedy is always the same, says what to do.
        os_error = isinstance(exc, OSError)
        text = f"{exc.filename}: {exc.strerror}" if os_error and exc.filename and exc.strerror else str(exc)
        if os_error and exc.errno in _OS_ERROR_ADVICE:
            text += f"; {_OS_ERROR_ADVICE[exc.errno]}"
        print(f"error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        partial = Path(args.out) / PARTIAL_FILE if args.command == "score" else None
        resumable = partial is not None and partial.exists()  # not before the first chunk, nor after the last
        print(f"interrupted: finished chunks are kept in {partial}; run the same command again to resume"
              if resumable else "interrupted", file=sys.stderr)
        return 130
    return 0
