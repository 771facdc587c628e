"""Run directories: configuration fingerprints, manifests and resumable append-only results.

A long scoring job appends finished rows to ``<name>.partial.jsonl`` (flushed and fsynced per
chunk). If it is killed, the next run repairs a torn last line, skips the rows already there,
and finally writes the complete file atomically in input order.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import write_json


class FingerprintMismatch(RuntimeError):
    """A run directory already holds results of a different configuration."""


def check_fingerprint(manifest_path: Path, fingerprint: str, inputs: dict, overwrite: bool = False) -> dict | None:
    """Return the existing manifest if it matches; refuse to mix configurations unless ``overwrite``."""
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("fingerprint") == fingerprint or overwrite:
        return manifest if manifest.get("fingerprint") == fingerprint else None
    old = manifest.get("fingerprint_inputs", {})
    changed = "; ".join(f"{k}: {old.get(k)!r} -> {inputs.get(k)!r}"
                        for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k))
    raise FingerprintMismatch(
        f"{manifest_path.parent} holds results of a different configuration ({changed or 'fingerprint differs'}). "
        "Use another output directory, or overwrite (--overwrite) to replace them."
    )


@dataclass
class PartialResults:
    """Append-only JSONL of finished rows, keyed by ``index``."""

    path: Path

    def load(self) -> dict[int, dict]:
        """Rows written so far; a torn last line (a crash mid-write) is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        rows: dict[int, dict] = {}
        for line in data[:good_end].splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["index"]] = row
        if good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return rows

    def append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def environment_info() -> dict[str, Any]:
    import torch
    import transformers

    from . import __version__

    return {
        "miwv_lib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(path: Path, **fields: Any) -> None:
    write_json(path, fields)
