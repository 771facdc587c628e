"""The ``select`` stage: read ``scores.jsonl`` strictly, check it belongs to the pool, write a subset."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.datasets import InstructionPool
from ..method.selection import (
    _RANKED,
    SelectionError,
    _is_finite_number,
)
from ..runtime.io import atomic_open, file_sha256


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
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SelectionError(f"{path}, row {len(scores)} (line {line_no}): not valid JSON ({exc.msg} at column "
                                 f"{exc.colno}); is this a complete scores.jsonl written by 'score'?") from None
        if not isinstance(row, dict):
            raise SelectionError(f"{path}, row {len(scores)} (line {line_no}): expected a JSON object, "
                                 f"got {type(row).__name__}")
        _check_score_fields(row, f"{path}, row {len(scores)} (line {line_no})")
        scores.append(row)
    if not scores:
        raise SelectionError(f"{path}: empty scores file (0 rows)")
    return scores


# The fields selection reads, and what 'score' writes in them: anything else was not written by 'score'.
_NUMBER_FIELDS = ("miwv", "ifd", "zero_shot_loss", "one_shot_loss", "unconditional_loss", "response_tokens")


def _check_score_fields(row: dict, where: str) -> None:
    """A row's ``index`` and ``id`` have the types 'score' writes, and its scores are finite numbers or null."""
    problem = None
    if isinstance(row.get("index"), bool) or not isinstance(row.get("index"), int):
        problem = "index", "an integer"
    elif not isinstance(row.get("id"), str):
        problem = "id", "a string"
    else:
        for name in _NUMBER_FIELDS:
            if row.get(name) is not None and not _is_finite_number(row[name]):
                problem = name, "a finite number or null"
                break
    if problem:
        name, expected = problem
        raise SelectionError(f"{where}, field {name!r}: expected {expected}, got {row.get(name)!r}; this is not "
                             "what 'score' writes (was the file edited?): score again")


def check_scores_integrity(scores_path: str | Path) -> None:
    """Refuse an unfinished run's partial file, and a scores file changed after 'score' wrote it (its checksum
    in the ``manifest.json`` beside it): a hand-edited number must not rank a row first."""
    scores_path = Path(scores_path)
    if scores_path.name.startswith("scores.partial"):
        raise SelectionError(f"{scores_path} holds the finished chunks of an unfinished run: run the same 'score' "
                             f"command again to finish it, then select from {scores_path.parent / 'scores.jsonl'}")
    manifest_path = scores_path.parent / "manifest.json"
    if scores_path.is_file() and manifest_path.is_file() and _manifest_beside(scores_path) is None:
        raise SelectionError(f"{manifest_path} is damaged (not a JSON object), so {scores_path} cannot be checked "
                             "against the checksum it records: restore the manifest, or score again")
    if scores_path.is_file() and scores_changed(scores_path, _manifest_beside(scores_path)):
        raise SelectionError(f"{scores_path} was changed after 'score' wrote it (its checksum differs from the one in "
                             f"{scores_path.parent / 'manifest.json'}); restore it, or score again")


def scores_changed(scores_path: Path, manifest: dict | None) -> bool:
    """The file differs from the one its run wrote (the manifest's ``scores_sha256``; older runs have none)."""
    recorded = manifest.get("scores_sha256") if manifest else None
    return bool(recorded) and file_sha256(scores_path) != recorded


def load_checked_scores(pool: InstructionPool, scores_path: str | Path) -> list[dict]:
    """The scores of ``pool``, refused if unfinished, changed by hand, or computed on another dataset."""
    check_scores_integrity(scores_path)
    scores = load_scores(scores_path)
    check_scores_match(pool, scores, scores_path)
    check_scores_provenance(pool, scores_path)
    return scores


def check_scores_provenance(pool: InstructionPool, scores_path: str | Path) -> None:
    """If the run's ``manifest.json`` sits next to the scores, refuse scores computed on other data.

    This catches what ids alone cannot: another dataset that happens to use the same ids (0, 1, 2, ...).
    """
    manifest = _manifest_beside(Path(scores_path))
    try:
        scored_hash = manifest["fingerprint_inputs"]["data"]
    except (KeyError, TypeError):
        return  # no (readable) manifest: the id check is all there is
    if scored_hash != pool.content_hash:
        manifest_path = Path(scores_path).parent / "manifest.json"
        raise SelectionError(
            f"{scores_path} was computed on other data than {pool.source} (content hash {scored_hash} in "
            f"{manifest_path}, {pool.content_hash} for this data, {len(pool)} rows); use the --data and --limit "
            "that 'score' used")


def _manifest_beside(scores_path: Path) -> dict | None:
    try:
        manifest = json.loads((scores_path.parent / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


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
    """``json`` or ``jsonl`` from the file name (any case); any other suffix is a SelectionError, not JSON in disguise."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise SelectionError(f"{out}: a subset is written as .json (a list of rows) or .jsonl (one row per line); "
                             f"got {Path(out).suffix or 'no suffix'!r}")
    return suffix[1:]


def export_subset(pool: InstructionPool, scores: list[dict], indices: list[int], out: str | Path,
                  by: str = "miwv") -> Path:
    """Write the chosen rows in the input's own schema (JSON list, or JSONL for .jsonl), scores attached."""
    out = Path(out)
    fmt = subset_format(out)
    score_field = _RANKED.get(by, ("miwv", True))[0]
    records = []
    for rank, i in enumerate(indices):
        record = dict(pool.records[i])
        record["miwv_selection"] = {"rank": rank, "index": i, "id": pool.rows[i]["id"], "method": by,
                                    score_field: scores[i].get(score_field),
                                    "miwv": scores[i].get("miwv"), "ifd": scores[i].get("ifd")}
        records.append(record)
    with atomic_open(out) as handle:
        if fmt == "jsonl":
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, handle, ensure_ascii=False, indent=2)
            handle.write("\n")
    return out
