"""Loading instruction pools and test sets into rows of exactly ``{"id", "instruction", "input", "output"}`` (all
strings), keeping each original record so that a selected subset can be exported in the schema it came in. Loading
is strict on purpose: a selection is only as trustworthy as its pool, so malformed input raises :class:`DataError`
naming the file, row and field instead of being skipped or "fixed". Text is never rewritten."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from ..runtime.io import changed_since_written, checksum_path, stable_hash, unwritable, write_jsonl

DATA_DIR_ENV = "MIWV_DATA_DIR"
CACHE_DIR_ENV = "MIWV_CACHE_DIR"
DEFAULT_DATASET = "alpaca"
TEST_SETS = ("vicuna", "koala", "wizardlm", "sinstruct", "lima")

_REPO_ROOT = Path(__file__).resolve().parents[2]  # package-relative, so it works from any working directory

FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}

# Test sets carry their own id under different names; everything else uses "id".
_ID_KEYS = {"vicuna": "question_id", "wizardlm": "idx"}

_USER_ROLES = frozenset({"user", "human"})
_ASSISTANT_ROLES = frozenset({"assistant", "gpt", "chatgpt", "model", "bard", "bing"})

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_LONG_NUMBER = re.compile(r"\d{%d,}" % ((sys.get_int_max_str_digits() or 4300) + 1))
_IS_DIRECTORY = "is a directory, expected a .json, .jsonl or .parquet file"

# The registry (name → local mirror files, hub id, schema, row counts, licence, how to obtain it) ships as data.
# datasets>=4 refuses the script-based alpaca_eval hub repo, so its entries name the raw JSON files (hub_data_files).
REGISTRY: dict[str, dict[str, Any]] = json.loads((Path(__file__).with_name("registry.json")).read_text("utf-8"))


def load_registry() -> dict[str, dict]:
    """The dataset registry (a deep copy, so callers cannot corrupt the module constant)."""
    return copy.deepcopy(REGISTRY)


class DataError(ValueError):
    """Bad input, naming file (or hub id), 0-based row and field: ``alpaca.json, row 17, field 'output': ...``."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None, line: int | None = None) -> None:
        self.detail, self.source, self.row, self.field, self.line = message, source, row, field, line
        parts = [] if source is None else [str(source)]
        if row is not None:
            parts.append(f"row {row}" + ("" if line is None else f" (line {line})"))
        elif line is not None:
            parts.append(f"line {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(", ".join(parts) + ": " + message if parts else message)


class DataWarning(UserWarning):
    """Suspicious but valid input (duplicates, dropped conversation turns)."""


# A DataError located at one record: ``fail(message, field=...)``, so that every check names file, row and line.
_Fail = Callable[..., DataError]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} ({_clip(repr(value), 60)})"


@dataclass
class InstructionPool:
    rows: list[dict]
    records: list[dict]
    source: str
    schema: str
    file_format: str
    duplicate_groups: list[list[int]] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)  # reference answers (sinstruct, alpaca_eval), else None
    files: list[str] = field(default_factory=list)  # files actually read (local or the hub cache), for provenance

    def __post_init__(self) -> None:
        if not self.references:
            self.references = [None] * len(self.rows)
        if not (len(self.rows) == len(self.records) == len(self.references)):
            raise ValueError(f"InstructionPool lengths disagree: rows={len(self.rows)}, records={len(self.records)}, "
                             f"references={len(self.references)}")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    @property
    def content_hash(self) -> str:
        return stable_hash([(r["id"], r["instruction"], r["input"], r["output"]) for r in self.rows])

    def subset(self, indices: Sequence[int]) -> InstructionPool:
        """A new pool with the given rows (in the given order); duplicates are recomputed."""
        rows = [self.rows[i] for i in indices]
        return replace(self, rows=rows, records=[self.records[i] for i in indices],
                       duplicate_groups=_duplicate_groups(rows), references=[self.references[i] for i in indices],
                       files=list(self.files))


def format_source_text(row: Mapping[str, Any]) -> str:
    """The text embedded for neighbour search: instruction (+ "\\n" + input). Never the response,
    because selection must judge an example by what it asks, not by how well it was answered."""
    extra = row.get("input") or ""
    return f"{row['instruction']}\n{extra}" if extra.strip() else row["instruction"]


def content_id(instruction: str, input_text: str, output: str) -> str:
    """Stable id for records without one: first 16 hex chars of sha256 of JSON [instruction, input, output]."""
    return stable_hash([instruction, input_text, output])


@dataclass
class _RawFile:
    path: Path
    label: str  # how the file is named in messages and in InstructionPool.source
    file_format: str
    records: list[Any]
    lines: list[int] | None = None  # 1-based line of each record, for JSONL

    def fail_at(self, row: int) -> _Fail:
        return partial(DataError, source=self.label, row=row, line=self.lines[row] if self.lines else None)


def _read_text(path: Path, label: str, *, line_based: bool) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise DataError(_IS_DIRECTORY, source=label) from None
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", source=label) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].split(b"\n")
        row = sum(1 for chunk in before[:-1] if chunk.strip()) if line_based else None
        raise DataError(f"not valid UTF-8 at byte offset {exc.start} (bytes {data[exc.start : exc.start + 4]!r})",
                        source=label, row=row, line=len(before)) from None
    return text.removeprefix("\ufeff")  # a BOM is an encoding artefact, not content; json.loads rejects it


class _Twice(dict):
    """A JSON object that gave ``key`` more than once: ``json.loads`` would keep its last value without a word."""

    key: str


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj = _Twice(obj)
        obj.key = next(key for key, _ in pairs if key in seen or seen.add(key))
    return obj


def _given_twice(value: Any, path: str = "") -> str | None:
    """The path of the first key given twice in a JSON object within ``value``."""
    if isinstance(value, _Twice):
        return f"{path}.{value.key}" if path else value.key
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    return next(filter(None, (_given_twice(item, where) for where, item in children)), None)


def _parse_json(text: str, label: str, row: int | None = None, line: int | None = None) -> Any:
    """``json.loads`` of a whole .json file, or of the JSON Lines record at ``row`` on ``line``."""
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        if line is not None:
            raise DataError(f"not valid JSON: {exc.msg} at column {exc.colno}", source=label, row=row,
                            line=line) from None
        jsonl = exc.msg == "Extra data" and exc.lineno > 1
        hint = " (this looks like JSON Lines: one record per line; rename the file to .jsonl)" if jsonl else ""
        raise DataError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}{hint}",
                        source=label) from None
    except ValueError:  # not a syntax error: an integer too long for Python to convert
        match = _LONG_NUMBER.search(text)
        if match and line is None:
            line = text.count("\n", 0, match.start()) + 1
        digits = len(match.group()) if match else "too many"
        raise DataError(f"a number with {digits} digits, more than can be read (at most {sys.get_int_max_str_digits()})"
                        "; write it as a string", source=label, row=row, line=line) from None


def _read_parquet(path: Path, label: str) -> list[dict]:
    import pyarrow.parquet as pq  # lazy: pyarrow is slow to import and only needed here

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"not a readable parquet file ({type(exc).__name__}: {exc})", source=label) from None
    for column in table.schema:  # subsets and caches are JSON: a date, bytes or a decimal cannot be written back
        if not _json_type(column.type):
            raise DataError(f"column {column.name!r} has type {column.type}, which JSON cannot hold; store it as "
                            "text or drop the column", source=label)
    try:
        return table.to_pylist()
    except (ValueError, TypeError) as exc:  # a struct with two fields of one name, say
        raise DataError(f"its rows cannot be read as records ({exc})", source=label) from None


def _json_type(arrow_type) -> bool:
    import pyarrow.types as t

    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_dictionary(arrow_type):  # pandas categories
        return _json_type(arrow_type.value_type)
    if t.is_struct(arrow_type):
        return all(_json_type(field.type) for field in arrow_type)
    return any(check(arrow_type) for check in (t.is_null, t.is_boolean, t.is_integer, t.is_floating, t.is_string,
                                               t.is_large_string))


def _read_file(path: Path, label: str, empty: str = "empty file (0 rows)") -> _RawFile:
    file_format = FILE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DataError(f"unsupported file type {path.suffix or '(no suffix)'!r}; expected one of "
                        f"{sorted(FILE_FORMATS)}", source=label)
    if not path.exists():
        raise DataError("file not found", source=label)
    raw = _RawFile(path, label, file_format, [])
    if file_format == "parquet":
        raw.records = _read_parquet(path, label)
    elif file_format == "jsonl":
        # Not str.splitlines(): it also splits on U+2028 etc., which json.dumps(ensure_ascii=False) leaves in strings.
        lines = _read_text(path, label, line_based=True).split("\n")
        raw.lines = [no for no, line in enumerate(lines, start=1) if line.strip()]  # blank lines carry no record
        raw.records = [_parse_json(lines[no - 1], label, row, no) for row, no in enumerate(raw.lines)]
    else:
        text = _read_text(path, label, line_based=False)
        raw.records = _parse_json(text, label) if text.strip() else []
        if isinstance(raw.records, dict):
            raise DataError(f"expected a JSON list of records, got an object with keys {list(raw.records)[:10]}",
                            source=label)
        if not isinstance(raw.records, list):
            raise DataError(f"expected a JSON list of records, got {_describe(raw.records)}", source=label)
    if not raw.records:
        raise DataError(empty, source=label)
    return raw


def record_count(path: str | Path) -> int:
    """Records in a data file as the loaders read them (a parquet file's from its footer, without reading it)."""
    path = Path(path)
    if FILE_FORMATS.get(path.suffix.lower()) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return len(_read_file(path, path.name).records)


def detect_schema(record: Mapping[str, Any]) -> str | None:
    """Schema name from a record's keys (most specific first), or None if unrecognised."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        # LIMA's test file stores the prompt as a plain string; ShareGPT uses a list of turns.
        return "lima" if isinstance(record["conversations"], str) else "sharegpt"
    if "instruction" in keys:
        if "instances" in keys:
            return "sinstruct"
        return "alpaca_eval" if {"output", "generator"} <= keys and "input" not in keys else "alpaca"
    if "Instruction" in keys:
        return "wizardlm"
    if "prompt" in keys:
        return "prompt_response" if "response" in keys else "prompt_completion" if "completion" in keys else "koala"
    if "text" in keys and ({"category", "question_id"} & keys):
        return "vicuna"
    return None


class _Normalised(NamedTuple):
    instruction: str
    input: str
    output: str
    reference: str | None = None
    more_turns: bool = False  # conversation had user/assistant turns beyond the first exchange
    dropped_other: bool = False  # conversation had system/tool turns that were dropped


def _text(record: Mapping[str, Any], key: str, fail: _Fail, *, field_name: str | None = None,
          required: bool = True, nonblank: bool = False) -> str:
    """A string field, validated; ``field_name`` is the path shown in errors (for nested fields)."""
    name = field_name or key
    if key not in record:
        if required:
            raise fail(f"missing required field (record has keys {sorted(record)[:10]})"
                       f"{_case_hint(record, (key,))}", field=name)
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise fail(f"expected a string, got {_describe(value)}", field=name)
    if nonblank and not value.strip():
        raise fail("empty or whitespace-only text", field=name)
    return value


def _flat(instruction_key: str, output_key: str | None, rec: Mapping, fail: _Fail, require_output: bool, *,
          with_input: bool = False, reference: str | None = None) -> _Normalised:
    """A schema whose fields are top-level strings; a key of None: the field is absent."""
    return _Normalised(_text(rec, instruction_key, fail, nonblank=True),
                       _text(rec, "input", fail, required=False) if with_input else "",
                       _text(rec, output_key, fail, required=require_output, nonblank=require_output)
                       if output_key else "",
                       _text(rec, reference, fail) if reference else None)


def _first_exchange(turns_key: str, role_key: str, content_key: str, rec: Mapping, fail: _Fail,
                    require_output: bool) -> _Normalised:
    """First user turn and the first assistant turn after it; the rest is dropped (and counted)."""
    if turns_key not in rec:
        raise fail("missing required field", field=turns_key)
    turns = rec[turns_key]
    if not isinstance(turns, list) or not turns:
        raise fail(f"expected a non-empty list of turns, got {_describe(turns)}", field=turns_key)
    roles: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise fail(f"expected an object, got {_describe(turn)}", field=f"{turns_key}[{i}]")
        roles.append(_text(turn, role_key, fail, field_name=f"{turns_key}[{i}].{role_key}").lower())

    def content(i: int, nonblank: bool) -> str:
        return _text(turns[i], content_key, fail, field_name=f"{turns_key}[{i}].{content_key}", nonblank=nonblank)

    user = next((i for i, r in enumerate(roles) if r in _USER_ROLES), None)
    if user is None:
        raise fail(f"no user turn (roles seen: {sorted(set(roles))})", field=turns_key)
    instruction = content(user, nonblank=True)
    reply = next((i for i in range(user + 1, len(roles)) if roles[i] in _ASSISTANT_ROLES), None)
    if reply is None and require_output:
        raise fail("no assistant turn after the first user turn", field=turns_key)
    output = "" if reply is None else content(reply, nonblank=require_output)
    dialogue = sum(1 for r in roles if r in _USER_ROLES or r in _ASSISTANT_ROLES)
    return _Normalised(instruction, "", output, more_turns=dialogue > 1 + (reply is not None),
                       dropped_other=dialogue < len(roles))


def _norm_sinstruct(rec: Mapping, fail: _Fail, require_output: bool) -> _Normalised:
    instruction = _text(rec, "instruction", fail, nonblank=True)
    instances = rec.get("instances")
    if not isinstance(instances, list) or not instances:
        raise fail(f"expected a non-empty list of instances, got {_describe(instances)}", field="instances")
    first = instances[0]
    if not isinstance(first, Mapping):
        raise fail(f"expected an object, got {_describe(first)}", field="instances[0]")
    input_text = _text(first, "input", fail, field_name="instances[0].input", required=False)
    reference = _text(first, "output", fail, field_name="instances[0].output") if "output" in first else None
    return _Normalised(instruction, input_text, "", reference)


# Every schema: the keys it needs (shown in "unknown schema" errors) and its normaliser; training pools, then test sets.
_SCHEMAS: dict[str, tuple[str, Callable[[Mapping, _Fail, bool], _Normalised]]] = {
    "alpaca": ("instruction, input (optional), output", partial(_flat, "instruction", "output", with_input=True)),
    "prompt_response": ("prompt, response", partial(_flat, "prompt", "response")),
    "prompt_completion": ("prompt, completion", partial(_flat, "prompt", "completion")),
    "messages": ("messages: [{role, content}, ...]", partial(_first_exchange, "messages", "role", "content")),
    "sharegpt": ("conversations: [{from, value}, ...]", partial(_first_exchange, "conversations", "from", "value")),
    "vicuna": ("text, category", partial(_flat, "text", None)),
    "koala": ("prompt", partial(_flat, "prompt", None)),
    "wizardlm": ("Instruction, Skill, Difficulty", partial(_flat, "Instruction", None)),
    "sinstruct": ("instruction, instances: [{input, output}]", _norm_sinstruct),
    "lima": ("conversations (a string)", partial(_flat, "conversations", None)),
    # The "output" here is a baseline model's answer, i.e. a reference, not training data;
    # it may legitimately be empty (two davinci-003 answers are).
    "alpaca_eval": ("instruction, output, generator, dataset", partial(_flat, "instruction", None, reference="output")),
}
SCHEMAS = tuple(_SCHEMAS)


def _record_id(rec: Mapping, schema: str, norm: _Normalised, fail: _Fail) -> str:
    key = _ID_KEYS.get(schema, "id")
    # A null id (e.g. a sparse parquet column) means "no id", like a missing key.
    if rec.get(key) is None:
        return content_id(norm.instruction, norm.input, norm.output)
    value = rec[key]
    # bool is an int subclass, but True as an id is almost certainly a bug upstream.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail(f"expected a string or integer id, got {_describe(value)}", field=key)
    if isinstance(value, str) and not value.strip():
        raise fail("empty id", field=key)
    return str(value)


_TRAINING_KEYS = ("instruction", "input", "output", "prompt", "response", "completion", "messages", "conversations")


def _case_hint(record: Mapping, wanted: Sequence[str] = _TRAINING_KEYS) -> str:
    """``; rename the field 'Instruction' to 'instruction'`` when a key differs from a wanted one only in case."""
    renames = [f"{key!r} to {want!r}" for key in record if isinstance(key, str) for want in wanted
               if key != want and key.lower() == want and want not in record]
    return f"; field names are case-sensitive: rename the field {', '.join(renames[:3])}" if renames else ""


def _file_schema(raw: _RawFile) -> str:
    first = raw.records[0]
    if not isinstance(first, Mapping):
        raise raw.fail_at(0)(f"expected a JSON object (record), got {_describe(first)}")
    schema = detect_schema(first)
    if schema is None:
        accepted = "; ".join(f"{name} {{{keys}}}" for name, (keys, _) in _SCHEMAS.items())
        raise DataError(f"unknown schema: keys seen {sorted(first)[:20]}{_case_hint(first)}; accepted schemas: "
                        f"{accepted}", source=raw.label, row=0)
    return schema


def _duplicate_groups(rows: Sequence[Mapping[str, str]]) -> list[list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["instruction"], row["input"]), []).append(i)
    return [idx for idx in groups.values() if len(idx) > 1]


def _warn(message: str) -> None:
    """A DataWarning pointed at the first caller outside this module."""
    frame, level = sys._getframe(), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DataWarning, stacklevel=level)


def _check_count(name: str, value: Any, source: str | None = None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer or None, got {_describe(value)}", source=source)


def _build_pool(raws: list[_RawFile], *, source: str, file_format: str, require_output: bool,
                limit: int | None) -> InstructionPool:
    schemas = [_file_schema(raw) for raw in raws]
    if len(set(schemas)) > 1:
        mix = ", ".join(f"{raw.label} is {s!r}" for raw, s in zip(raws, schemas))
        raise DataError(f"files to concatenate must share one schema, but {mix}", source=source)
    schema = schemas[0]
    if require_output and schema in (*TEST_SETS, "alpaca_eval"):
        first, alpaca = raws[0].records[0], ("instruction", "input", "output")
        if _case_hint(first, ("output",)):  # capitalised Alpaca, not a test set
            raise DataError(_case_hint(first, alpaca).lstrip("; "), source=source, row=0)
        raise DataError(f"the rows look like the {schema!r} test set (prompts only, no responses to score or train "
                        "on); give a training pool with instruction and output (test sets are read by 'evaluate', "
                        "or load_test_set in Python)", source=source)
    rows: list[dict] = []
    records: list[dict] = []
    norms: list[_Normalised] = []
    # Rows past the limit are neither kept nor validated; a slice, unlike islice, takes a limit past sys.maxsize.
    for fail, rec in [(raw.fail_at(i), rec) for raw in raws for i, rec in enumerate(raw.records)][:limit]:
        if not isinstance(rec, Mapping):
            raise fail(f"expected a JSON object (record), got {_describe(rec)}")
        # Subsets, scores and hub caches are standard JSON: a value that cannot be written back (NaN,
        # Infinity, an unpaired surrogate) is refused here, not when a subset is written later.
        if found := unwritable(rec):
            raise fail(found[1], field=found[0] or None)
        if twice := _given_twice(rec):
            raise fail("this key is given twice in the record, and only one value can be meant: keep one",
                       field=twice)
        norm = _SCHEMAS[schema][1](rec, fail, require_output)
        rows.append({"id": _record_id(rec, schema, norm, fail), "instruction": norm.instruction,
                     "input": norm.input, "output": norm.output})
        records.append(rec)
        norms.append(norm)
    more_turns, dropped_other = sum(n.more_turns for n in norms), sum(n.dropped_other for n in norms)
    if schema in ("messages", "sharegpt") and (more_turns or dropped_other):
        _warn(f"{source}: only the first user turn and the first assistant turn after it are used; "
              f"{more_turns} of {len(rows)} rows had more user/assistant turns, "
              f"{dropped_other} had system or other turns (all dropped)")
    groups = _duplicate_groups(rows)
    if groups:
        _warn(f"{source}: {len(groups)} (instruction, input) pairs occur more than once "
              f"({sum(len(g) - 1 for g in groups)} duplicate rows); first groups of row numbers: "
              + ", ".join(str(g) for g in groups[:5]))
    return InstructionPool(rows=rows, records=records, source=source, schema=schema, file_format=file_format,
                           duplicate_groups=groups, references=[n.reference for n in norms],
                           files=[str(raw.path) for raw in raws])


def _load_files(files: Sequence[str | Path], *, require_output: bool, limit: int | None) -> InstructionPool:
    located = [(Path(os.path.expanduser(item)), str(item)) for item in files]
    for path, label in located:
        if path.is_file() and changed_since_written(path):  # a subset 'select' wrote, then edited by hand
            sidecar = checksum_path(label).name
            raise DataError(f"changed after it was written (its sha256 differs from the one in {sidecar}): restore "
                            f"it or write it again; to use the edited file as your own data, delete {sidecar}",
                            source=label)
    raws = [_read_file(path, label) for path, label in located]
    formats = dict.fromkeys(raw.file_format for raw in raws)
    return _build_pool(raws, source=" + ".join(raw.label for raw in raws), file_format="+".join(formats),
                       require_output=require_output, limit=limit)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """Explicit argument > ``$MIWV_DATA_DIR`` > None. DataError if the chosen one is not a directory."""
    explicit = data_dir is not None and str(data_dir) != ""
    origin, chosen = ("data_dir", str(data_dir)) if explicit else (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV))
    if not chosen:
        return None
    path = Path(os.path.expanduser(chosen))
    if not path.is_dir():
        raise DataError(f"data directory (from {origin}) does not exist or is not a directory", source=chosen)
    return path


def _download_hub(hub_id: str, *, config: str | None, split: str, data_files: list[str] | None) -> list[dict]:
    try:
        import datasets  # lazy: slow to import and unnecessary for local files
    except ImportError as exc:
        raise DataError(f"the 'datasets' package is needed to download from the hub ({exc}); "
                        f"set {DATA_DIR_ENV} or pass a local path instead", source=hub_id) from None
    try:
        if data_files:  # script-based hub repos cannot be loaded by datasets>=4: read their raw files
            urls = [f"hf://datasets/{hub_id}/{name}" for name in data_files]
            dataset = datasets.load_dataset("json", data_files=urls, split="train")
        else:
            dataset = datasets.load_dataset(hub_id, split=split, **({"name": config} if config else {}))
    except Exception as exc:  # network, auth, missing repo: all mean "no data from the hub"
        raise DataError(f"could not load from the Hugging Face hub: the hub is unreachable or the dataset is "
                        f"unavailable ({_clip(f'{type(exc).__name__}: {exc}', 300)}). Set {DATA_DIR_ENV} to a local "
                        "data mirror (see data/README.md) or pass a local .json/.jsonl/.parquet path instead",
                        source=hub_id) from None
    return dataset.to_list()


def _load_hub(hub_id: str, *, config: str | None = None, split: str = "train", data_files: list[str] | None = None,
              cache_dir: str | Path | None, require_output: bool, limit: int | None) -> InstructionPool:
    """``hub_id`` from its cache file ``<owner>__<name>[__<config>][__<split>].jsonl`` (no split when "train"),
    else downloaded into it. The cache is ``cache_dir`` > ``$MIWV_CACHE_DIR`` > ``<repo>/data/cache`` (a source
    checkout) > ``~/.cache/miwv_lib/data`` (installed: never next to site-packages)."""
    if cache_dir is None and os.environ.get(CACHE_DIR_ENV):
        cache_dir = os.environ[CACHE_DIR_ENV]
    if cache_dir is not None:
        root = Path(os.path.expanduser(cache_dir))
    elif (_REPO_ROOT / "data").is_dir():
        root = _REPO_ROOT / "data" / "cache"
    else:
        root = Path.home() / ".cache" / "miwv_lib" / "data"
    stem = hub_id.replace("/", "__") + (f"__{config}" if config else "") + (f"__{split}" if split != "train" else "")
    cache, source = root / f"{stem}.jsonl", f"{hub_id} [{config}]" if config else hub_id
    if cache.is_file():  # errors name the cache file, which the user may delete
        raw = _read_file(cache, str(cache), empty="empty hub cache file (0 rows); delete it to download again")
    else:
        records = _download_hub(hub_id, config=config, split=split, data_files=data_files)
        if not records:
            raise DataError("the hub dataset has 0 rows", source=source)
        try:
            if not cache.parent.exists():  # downloads are large and regenerable: keep them out of git
                cache.parent.mkdir(parents=True, exist_ok=True)
                (cache.parent / ".gitignore").write_text("*\n", encoding="utf-8")
            write_jsonl(cache, records)
        except (OSError, TypeError) as exc:
            warnings.warn(f"could not write hub cache {cache} ({exc}); the next load will download again", DataWarning)
        raw = _RawFile(cache, source, "hub", records)
    return _build_pool([raw], source=source, file_format="hub", require_output=require_output, limit=limit)


def _load_registered(name: str, entry: Mapping[str, Any], *, data_dir: str | Path | None,
                     cache_dir: str | Path | None, require_output: bool, limit: int | None) -> InstructionPool:
    root = resolve_data_dir(data_dir)
    local = list(entry.get("local_files") or [])
    if root is None:
        local_note = f"no data directory set (pass data_dir= or set {DATA_DIR_ENV})"
    else:
        paths = [root / rel for rel in local]
        missing = [rel for rel, p in zip(local, paths) if not p.is_file()]
        if local and not missing:
            return _load_files(paths, require_output=require_output, limit=limit)
        local_note = f"data directory {root} lacks {missing or 'local files for it'}"
    if not entry.get("hub_id"):
        raise DataError(f"no local copy ({local_note}) and no hub id. How to get it: {entry['obtain']}", source=name)
    try:
        return _load_hub(entry["hub_id"], config=entry.get("hub_config"), split=entry.get("hub_split") or "train",
                         data_files=entry.get("hub_data_files"), cache_dir=cache_dir, require_output=require_output,
                         limit=limit)
    except DataError as exc:
        if exc.row is not None:
            raise  # a content error in the downloaded data, not a resolution problem
        raise DataError(f"{exc} [local copy: {local_note}]", source=name) from None


def load_instructions(source: str | Path | list | None = None, *, data_dir: str | Path | None = None,
                      require_output: bool = True, limit: int | None = None,
                      cache_dir: str | Path | None = None) -> InstructionPool:
    """Load and validate an instruction pool. ``source``: an existing local file (or a list of files, concatenated),
    a registry name (local mirror in the data dir, else its hub id), a hub id ``owner/name`` (cached as JSONL after
    the first download), or None for DEFAULT_DATASET. ``limit`` keeps the first N rows (the rest are not validated)."""
    _check_count("limit", limit)
    source = DEFAULT_DATASET if source is None else source
    if isinstance(source, (list, tuple, Path)):
        files = [source] if isinstance(source, Path) else source
        if not files:
            raise DataError("empty list of files")
        return _load_files(files, require_output=require_output, limit=limit)
    if not isinstance(source, str):
        raise DataError(f"source must be a path, a list of paths, a registry name or a hub id, got {_describe(source)}")
    path, suffix = Path(os.path.expanduser(source)), Path(source).suffix.lower()
    if path.is_file():
        return _load_files([source], require_output=require_output, limit=limit)
    if source in REGISTRY:
        return _load_registered(source, REGISTRY[source], data_dir=data_dir, cache_dir=cache_dir,
                                require_output=require_output, limit=limit)
    if path.is_dir():
        raise DataError(_IS_DIRECTORY, source=source)
    if suffix not in FILE_FORMATS and _HUB_ID_RE.match(source):
        try:
            return _load_hub(source, cache_dir=cache_dir, require_output=require_output, limit=limit)
        except DataError as exc:
            if exc.row is not None:
                raise
            raise DataError(f"{exc.detail} (no local file named {source!r} exists either)", source=source) from None
    if suffix in FILE_FORMATS or "/" in source or os.sep in source:
        raise DataError("file not found", source=source)
    raise DataError(f"unknown dataset: not a file, not a registry name ({', '.join(REGISTRY)}) and not a hub id "
                    "'owner/name'", source=source)


def load_test_set(name: str, *, data_dir: str | Path | None = None, sample: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None) -> InstructionPool:
    """A test set (prompts; output ""), optionally a sample of ``sample`` rows in their original order that depends
    only on (rows, sample, seed), so that evaluations on a subsample are reproducible and comparable."""
    _check_count("sample", sample, source=str(name))
    pool = load_instructions(name, data_dir=data_dir, require_output=False, cache_dir=cache_dir)
    first: dict[str, int] = {}
    for i, row in enumerate(pool.rows):  # two models' answers are paired by id
        j = first.setdefault(row["id"], i)
        if (row["instruction"], row["input"]) != (pool.rows[j]["instruction"], pool.rows[j]["input"]):
            raise DataError(f"id {row['id']!r} is also row {j}'s, a different prompt: answers are paired by id, so "
                            "each prompt needs an id of its own", source=pool.source, row=i, field="id")
    if sample is None or sample >= len(pool):
        return pool
    return pool.subset(sorted(random.Random(seed).sample(range(len(pool)), sample)))
