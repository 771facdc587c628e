"""Small file helpers: atomic writes, JSON lines and content hashes. Every output goes through these so that
a crash never leaves a half-written file that looks complete (write to a temp file, fsync, rename)."""

from __future__ import annotations

import _thread
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise naming(exc, path) from exc
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give outputs the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise naming(exc, path) from exc
        raise


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` naming the file being written: a full disk's ENOSPC (raised by write or fsync) names none."""
    if exc.filename is not None and Path(exc.filename) == Path(path):
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))  # OSError() picks the subclass for the errno


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, default=_json_default)
        handle.write("\n")
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    with atomic_open(path) as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows)
    return Path(path)


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append ``rows`` with one write() and an fsync, so that a crash can tear only the last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    try:
        with open(path, "ab") as handle:  # O_APPEND; the buffer passes a large blob to one write() whole
            handle.write(blob.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise naming(exc, path) from exc


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def unwritable(value: Any, *, json_types: bool = False) -> tuple[str, str] | None:
    """(key path, problem) of the first value in ``value`` that cannot be written back as standard UTF-8 JSON
    (NaN, Infinity, an unpaired surrogate; with ``json_types``, also a value of any other type, such as a date)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, f"{item} (NaN or Infinity) is not standard JSON; write null or a string instead"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, f"an unpaired surrogate ({item[exc.start]!r}, a broken \\u escape) is not valid text"
        elif isinstance(item, Mapping):
            stack.extend((path, key) for key in item if isinstance(key, str))
            stack.extend((f"{path}.{key}" if path else str(key), v) for key, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif json_types and item is not None and not isinstance(item, (bool, int, float)):
            return path, f"a {type(item).__name__} ({item!r}) is not a JSON value; quote it"
    return None


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def keep_interrupts() -> None:
    """A Ctrl-C that lands in a finalizer (``__del__``) would be printed as "Exception ignored" and lost,
    and the run would go on: raise it again, where the program is, so the command stops cleanly."""
    def hook(report) -> None:
        if isinstance(report.exc_value, KeyboardInterrupt):  # a moment later: raised here, it would be lost again
            threading.Timer(0.05, _thread.interrupt_main).start()
        else:
            sys.__unraisablehook__(report)

    sys.unraisablehook = hook


def save_png(fig, path: str | Path, dpi: int = 110, close: bool = False) -> Path:
    """The one figure writer: a PNG written to a temp file, then renamed (``close``: free the figure too)."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return Path(path)


def checksum_path(path: str | Path) -> Path:
    """``<path>.sha256``: the checksum a final output is written with, in ``sha256sum`` format."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_checksum(path: str | Path) -> Path:
    """Record ``path``'s sha256 beside it, so a reader can refuse a copy edited by hand (``sha256sum -c`` reads it)."""
    with atomic_open(checksum_path(path)) as handle:
        handle.write(f"{file_sha256(path)}  {Path(path).name}\n")
    return checksum_path(path)


def changed_since_written(path: str | Path) -> bool:
    """``path`` no longer has the sha256 recorded beside it (False when none is recorded)."""
    try:
        recorded = checksum_path(path).read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    return not recorded or recorded[0] != file_sha256(path)
