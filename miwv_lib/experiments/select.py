"""The ``select`` stage: read ``scores.jsonl`` strictly, check it belongs to the pool, write a subset."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..data.datasets import InstructionPool
from ..method.selection import RANKED_BY, SELECTION_METHODS, SelectionError, is_finite_number
from ..runtime.io import file_sha256, write_checksum, write_json, write_jsonl
from ..runtime.schema import number

SELECTIONS_FILE = "subsets/selections.json"  # a run's arms and the rows each was given (engine.write_selections)
ratio_rule = number(0, 1, above=True, below=True)  # a subset's share of the pool, in settings (--ratio takes 1 too)


def method_rule(method: object) -> str | None:
    return None if method in SELECTION_METHODS else f"expected one of {', '.join(SELECTION_METHODS)}, got {method!r}"


# The fields selection reads, and what 'score' writes in them: anything else was not written by 'score'.
_FIELDS = [("index", "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
           ("id", "a string", lambda v: isinstance(v, str))] + [
    (name, "a finite number or null", lambda v: v is None or is_finite_number(v))
    for name in ("miwv", "ifd", "zero_shot_loss", "one_shot_loss", "unconditional_loss", "response_tokens")]


def load_scores(path: str | Path) -> list[dict]:
    """Read a ``scores.jsonl``; a missing, damaged or foreign file is a SelectionError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        hint = " (pass the scores.jsonl inside it)" if (path / "scores.jsonl").exists() else ""
        raise SelectionError(f"{path}: is a directory, expected a scores.jsonl file{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SelectionError(f"{path}: scores file not found") from None
    except UnicodeDecodeError as exc:
        raise SelectionError(f"{path}: not a scores file (not valid UTF-8 at byte offset {exc.start})") from None
    except OSError as exc:
        raise SelectionError(f"{path}: cannot read the scores file ({exc.strerror or exc})") from None
    scores: list[dict] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, row {len(scores)} (line {line_no})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SelectionError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); is this a complete "
                                 "scores.jsonl written by 'score'?") from None
        if not isinstance(row, dict):
            raise SelectionError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for name, expected, ok in _FIELDS:  # a row that 'score' did not write
            if not ok(row.get(name)):
                raise SelectionError(f"{where}, field {name!r}: expected {expected}, got {row.get(name)!r}; this is "
                                     "not what 'score' writes (was the file edited?): score again")
        scores.append(row)
    if not scores:
        raise SelectionError(f"{path}: empty scores file (0 rows)")
    return scores


def scores_changed(scores_path: Path, manifest: dict | None) -> bool:
    """The file differs from the one its run wrote (the manifest's ``scores_sha256``; older runs have none)."""
    recorded = manifest.get("scores_sha256") if manifest else None
    return bool(recorded) and file_sha256(scores_path) != recorded


def load_checked_scores(pool: InstructionPool, scores_path: str | Path) -> list[dict]:
    """The scores of ``pool``, refused if unfinished, changed by hand (its checksum in the run's ``manifest.json``:
    a hand-edited number must not rank a row first), or computed on another dataset."""
    path, manifest_path = Path(scores_path), Path(scores_path).parent / "manifest.json"
    if path.name.startswith("scores.partial"):
        raise SelectionError(f"{path} holds the finished chunks of an unfinished run: run the same 'score' "
                             f"command again to finish it, then select from {path.parent / 'scores.jsonl'}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        if path.is_file() and manifest_path.is_file():
            raise SelectionError(f"{manifest_path} is damaged (not a JSON object), so {path} cannot be checked "
                                 "against the checksum it records: restore the manifest, or score again")
        manifest = {}  # none: the id check below is all there is
        if path.is_file():
            warnings.warn(f"{manifest_path} is missing, so {path} is checked by its ids alone: neither a hand edit "
                          "nor other data with the same ids can be caught", stacklevel=2)
    if path.is_file() and scores_changed(path, manifest):
        raise SelectionError(f"{path} was changed after 'score' wrote it (its checksum differs from the one in "
                             f"{manifest_path}); restore it, or score again")
    scores = load_scores(scores_path)
    check_scores_match(pool, scores, scores_path)
    # ids alone cannot tell another dataset that happens to use the same ids (0, 1, 2, ...)
    inputs = manifest.get("fingerprint_inputs")
    if isinstance(inputs, dict) and "data" in inputs and inputs["data"] != pool.content_hash:
        raise SelectionError(
            f"{scores_path} was computed on other data than {pool.source} (content hash {inputs['data']} in "
            f"{manifest_path}, {pool.content_hash} for this data, {len(pool)} rows); use the --data and --limit "
            "that 'score' used")
    return scores


def check_scores_match(pool: InstructionPool, scores: list[dict], scores_path: str | Path = "scores") -> None:
    """Refuse a scores file that belongs to another dataset (row count or ids differ)."""
    if len(scores) != len(pool):
        raise SelectionError(f"{scores_path} has {len(scores)} rows but the data has {len(pool)}: "
                             "it was computed on another dataset (or with another --limit)")
    for position, (score, row) in enumerate(zip(scores, pool.rows)):
        if score.get("index") != position:
            raise SelectionError(f"{scores_path}, row {position}, field 'index': expected {position}, got "
                                 f"{score.get('index')!r}; rows must be in the data's order, as 'score' writes them")
        if score.get("id") != row["id"]:
            raise SelectionError(f"{scores_path}, row {position}, field 'id': {score.get('id')!r} does not match the "
                                 f"data's id {row['id']!r}; these scores belong to another dataset")


def subset_format(out: str | Path) -> str:
    """``json`` or ``jsonl`` from the file name (any case); another suffix is a SelectionError, not JSON in disguise."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise SelectionError(f"{out}: a subset is written as .json (a list of rows) or .jsonl (one row per line); "
                             f"got {Path(out).suffix or 'no suffix'!r}")
    return suffix[1:]


def export_subset(pool: InstructionPool, scores: list[dict], indices: list[int], out: str | Path,
                  by: str = "miwv") -> Path:
    """Write the chosen rows in the input's own schema (JSON list, or JSONL for .jsonl), scores attached, and their
    sha256 beside them (``<out>.sha256``): loading the subset later refuses a hand-edited copy."""
    write = write_jsonl if subset_format(out) == "jsonl" else write_json
    field = RANKED_BY.get(by, ("miwv", True))[0]
    selection = [{"rank": rank, "index": i, "id": pool.rows[i]["id"], "method": by, field: scores[i].get(field),
                  "miwv": scores[i].get("miwv"), "ifd": scores[i].get("ifd")} for rank, i in enumerate(indices)]
    path = write(out, [{**pool.records[i], "miwv_selection": chosen} for i, chosen in zip(indices, selection)])
    write_checksum(path)
    return path
