"""Run directories: configuration fingerprints, manifests and resumable append-only results. A long job appends
finished rows to ``<name>.partial.jsonl`` (one fsynced write per chunk); if it is killed, the next run cuts off a torn
last line, skips the rows already there, and finally writes the complete file atomically in input order."""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .io import append_jsonl, naming, unwritable


class FingerprintMismatch(RuntimeError):
    """A run directory already holds results of a different configuration; ``changed`` names the inputs that differ
    (``config.max_steps``), empty when the old ones cannot be read."""

    def __init__(self, message: str, changed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.changed = changed


def _flat(inputs: dict) -> dict:
    """``{"config": {"max_steps": 2}}`` as ``{"config.max_steps": 2}``: a message names the setting that changed."""
    return {f"{k}.{sub}" if isinstance(v, dict) else k: item for k, v in inputs.items()
            for sub, item in (v.items() if isinstance(v, dict) else [(None, v)])}


def check_fingerprint(manifest_path: Path, fingerprint: str, inputs: dict, overwrite: bool = False) -> dict | None:
    """The existing manifest if it matches; otherwise (or if it is unreadable) refuse unless ``overwrite``."""
    if not manifest_path.exists():
        return None
    changed: tuple[str, ...] = ()
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"expected a JSON object, got {type(manifest).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        problem = (f"{manifest_path} is unreadable ({exc}), so the results in {manifest_path.parent} cannot be "
                   "matched to a configuration")
    else:
        if manifest.get("fingerprint") == fingerprint:
            return manifest
        old = manifest.get("fingerprint_inputs")
        old, new = _flat(old if isinstance(old, dict) else {}), _flat(inputs)
        changed = tuple(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        problem = (f"{manifest_path.parent} holds results of a different configuration "
                   f"({'; '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed) or 'fingerprint differs'})")
    if overwrite:
        return None
    raise FingerprintMismatch(f"{problem}. Use another output directory, or overwrite (--overwrite) to replace them.",
                              changed)


@dataclass
class PartialResults:
    """Append-only JSONL of finished rows, keyed by ``key`` (a row's ``index``, or a string such as a judgement's
    cache key): invalid lines are skipped, so their rows are computed again."""

    path: Path
    key: str = "index"
    key_type: type = int

    def load(self, repair: bool = True) -> dict[int | str, dict]:
        """Rows written so far; ``repair`` cuts a torn tail off the file (never while another process appends)."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        rows: dict[int, dict] = {}
        end = good_end = damaged = pending = 0  # pending: invalid lines since the last valid one
        for line in data.split(b"\n")[:-1]:  # what follows the last line break is a torn line, or nothing
            end += len(line) + 1
            try:
                row = json.loads(line)
            except ValueError:  # UnicodeDecodeError is a ValueError too
                row = None
            key = row.get(self.key) if isinstance(row, dict) else None
            if isinstance(key, self.key_type) and not isinstance(key, bool):  # else torn, damaged or not a row
                rows[key] = row
                good_end, damaged, pending = end, damaged + pending, 0
            elif line.strip():
                pending += 1
        if damaged and repair:
            warnings.warn(f"{self.path}: {damaged} damaged lines before the end are ignored; their rows will be "
                          "computed again", RuntimeWarning, stacklevel=2)
        if repair and good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
        return rows

    def append(self, rows: list[dict]) -> None:
        if rows:
            append_jsonl(self.path, rows)  # a full disk may tear the last line: the next load cuts it off


def environment_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        package = version("miwv-lib")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package = "unknown"
    return {"miwv_lib": package, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
            "ld_preload": os.environ.get("LD_PRELOAD") or None}  # another allocator (tcmalloc) moves CPU timings


def read_yaml_mapping(path: Path, shown: str | Path, error: type[Exception]) -> dict:
    """The settings in a YAML file; any problem is one ``error`` naming it as ``shown`` (the user's path)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # YAML lets a later key win silently
            seen = []
            for key_node, _ in node.value:
                if key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if not isinstance(key := self.construct_object(key_node, deep=deep), str):  # 1:, yes:, 2026-12-06:
                        raise error(f"{shown}, line {line}: key {key!r} is not a name; write it in quotes if it is one")
                    if key in seen:
                        raise error(f"{shown}, line {line}: key {key!r} is given twice")
                    seen.append(key)
            return super().construct_mapping(node, deep)

    if not path.is_file():
        raise error(f"configuration file not found: {shown}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeys)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{shown}: not a valid YAML text file ({exc})") from None
    if raw is None:  # all defaults would be a whole default run (the study's writes its committed report)
        raise error(f"{shown}: holds no settings (empty, or comments only)")
    if not isinstance(raw, Mapping):
        raise error(f"{shown}: expected a mapping of settings, got {type(raw).__name__}")
    if found := unwritable(raw, json_types=True):  # settings are recorded in JSON manifests: standard JSON only
        raise error(f"{shown}: key {found[0]!r}: {found[1]}")
    return dict(raw)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunDirectoryBusy(RuntimeError):
    """Another live process is scoring into the same run directory."""


@contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir/.lock`` (dropped by the kernel if its holder dies, even by SIGKILL); a
    second process gets :class:`RunDirectoryBusy` at once, naming the holder's pid from ``.lock.pid``."""
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / ".lock", timeout=0)
    try:
        held = lock.acquire()
    except Timeout:
        try:
            holder = (out_dir / ".lock.pid").read_text(encoding="ascii", errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunDirectoryBusy(
            f"{out_dir} is being written by another process (pid {holder}: a scoring run or a study); wait for it "
            "to finish, or use another output directory") from None
    with held:  # releases the lock
        try:
            (out_dir / ".lock.pid").write_text(f"{os.getpid()}\n", encoding="ascii")
        except OSError as exc:  # a full disk fails on close, naming no file
            raise naming(exc, out_dir / ".lock.pid") from exc
        yield
