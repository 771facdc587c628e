"""Reliability: bad input, a killed job, and run-to-run determinism, end to end through the CLI.

Every case runs ``python -m miwv_lib score|select ...`` in its own process and checks what a user
sees: the exit code, a message that names the file, row and field, no Python traceback, and input
files (and earlier results) left byte-for-byte as they were. The README's "What happens when…"
table lists the same cases.

Importing torch and transformers costs about 5 s per interpreter on this machine, too much for
~40 processes. So the table's processes are forked from one interpreter that has imported
``miwv_lib`` once and then runs the package exactly as ``python -m`` does (``runpy``, the same
exit-code and traceback handling). The kill-and-resume test, and
``test_forked_runner_matches_a_plain_subprocess``, use plain ``python -m miwv_lib`` processes;
``MIWV_TEST_PLAIN_SUBPROCESS=1`` makes every case a plain one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import make_rows
from miwv_lib.data.datasets import DataError, DataWarning, load_instructions
from miwv_lib.runtime.io import read_jsonl
from miwv_lib.runtime.runs import FingerprintMismatch, PartialResults, check_fingerprint
from miwv_lib.method.selection import SelectionError, select_indices, subset_size
from miwv_lib.experiments.select import load_scores

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random", "--embedder", "self", "--dtype", "float32"]
MAX_LENGTH = 256

# --------------------------------------------------------------------------- running the CLI

_SERVER = r"""
import json, os, runpy, sys, traceback
import miwv_lib.experiments.cli  # the expensive imports (torch, transformers), once
miwv_lib.experiments.cli.build_parser()  # and whatever building the parser imports
os.write(1, b"ready\n")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.argv = ["-m", *request["argv"]]
            try:
                runpy.run_module("miwv_lib", run_name="__main__", alter_sys=True)  # = python -m miwv_lib
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()  # what the interpreter prints for an uncaught exception
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.write(1, (json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n").encode())
"""


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    def assert_clean_error(self, *fragments: str) -> None:
        """Exit code 2, an ``error:`` line with every fragment, and no traceback."""
        assert self.rc == 2, f"exit code {self.rc}\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        message = "\n".join(line for line in self.stderr.splitlines() if line.startswith("error:")) or self.stderr
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"


class Cli:
    """``cli(*args)`` runs ``python -m miwv_lib *args`` in a new process and returns a :class:`Result`."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir, self.calls = env, workdir, 0
        self.plain = os.environ.get("MIWV_TEST_PLAIN_SUBPROCESS") == "1" or not hasattr(os, "fork")
        self.server = None
        if not self.plain:
            self.server_log = open(workdir / "server.log", "wb")
            self.server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=self.server_log, env=env, cwd=REPO)
            assert self._read_line(120) == "ready", (workdir / "server.log").read_text()[-3000:]

    def _read_line(self, timeout: float) -> str:
        buffer = b""
        deadline = time.monotonic() + timeout
        while not buffer.endswith(b"\n"):
            ready, _, _ = select.select([self.server.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"the CLI process did not finish in {timeout} s")
            chunk = os.read(self.server.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("runner died: " + (self.workdir / "server.log").read_text()[-3000:])
            buffer += chunk
        return buffer.decode().strip()

    def __call__(self, *argv: str | Path, timeout: float = 300) -> Result:
        argv = [str(a) for a in argv]
        if self.plain:
            done = subprocess.run([sys.executable, "-m", "miwv_lib", *argv], capture_output=True, text=True,
                                  env=self.env, cwd=REPO, timeout=timeout)
            return Result(done.returncode, done.stdout, done.stderr)
        self.calls += 1
        out, err = self.workdir / f"{self.calls}.out", self.workdir / f"{self.calls}.err"
        request = {"argv": argv, "cwd": str(REPO), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        self.server.stdin.flush()
        rc = json.loads(self._read_line(timeout))["rc"]
        return Result(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
            self.server_log.close()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MIWV_DATA_DIR", "RANK", "WORLD_SIZE")}
    # One thread: on a busy 2-core machine torch's default thread pool is 10-100x slower, and a fixed
    # thread count is part of what makes float32 results bit-for-bit reproducible.
    env.update(MIWV_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", PYTHONHASHSEED="0")
    return env


@pytest.fixture(scope="module")
def cli(cli_env, tmp_path_factory):
    runner = Cli(cli_env, tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


# --------------------------------------------------------------------------- helpers


def write_rows(path: Path, rows, fmt: str | None = None) -> Path:
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories)."""
    out = {}
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            if file.exists() and not file.name.startswith(".lock"):
                out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


LONG_OUTPUT = " ".join(["The river runs past the green city and the quick dog."] * 40)  # ~700 tokens alone


def base_rows() -> list[dict]:
    rows = make_rows(12, seed=7)
    rows.insert(4, {"instruction": "Describe the river.", "input": "", "output": LONG_OUTPUT})  # row 4: too long
    rows.append(dict(rows[2]))  # row 13: an exact duplicate of row 2
    return rows


@pytest.fixture(scope="module")
def base(cli, tmp_path_factory):
    """A finished run on a 14-row pool that holds a too-long response (row 4) and a duplicate (rows 2, 13)."""
    root = tmp_path_factory.mktemp("base")
    data = write_rows(root / "pool.json", base_rows())
    run = root / "run"
    result = cli("score", "--data", data, "--out", run, *FAST, "--max-length", MAX_LENGTH)
    assert result.rc == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "run": run, "scores": run / "scores.jsonl", "result": result}


# --------------------------------------------------------------------------- the table of bad inputs

GOOD = make_rows(6, seed=1)


def _file(name: str, content: str | bytes):
    def make(root: Path) -> Path:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return make


def _pool(name: str, rows: list) -> callable:
    return lambda root: write_rows(root / name, rows)


def _pool_beside(files: dict[str, str]) -> callable:
    """GOOD as ``a.json``, with other files beside it (a model that is not one)."""
    def make(root: Path) -> Path:
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text, encoding="utf-8")
        return write_rows(root / "a.json", GOOD)

    return make


def _with(**fields) -> list:
    """GOOD with row 3 replaced: fields set to a value, or removed when the value is ``...``."""
    bad = {**GOOD[3], **{k: v for k, v in fields.items() if v is not ...}}
    for key in [k for k, v in fields.items() if v is ...]:
        bad.pop(key)
    return GOOD[:3] + [bad] + GOOD[4:]


_JSONL = "".join(json.dumps(r) + "\n" for r in GOOD)
_JSONL_LINES = _JSONL.splitlines(keepends=True)

# (case id, data file maker, extra score arguments, fragments the error message must contain; "{file}" = the file)
SCORE_ERRORS = [
    ("not-json", _file("a.json", '[{"instruction": "x", "output": '), [], ["{file}", "not valid JSON"]),
    ("object-not-list", _file("a.json", json.dumps({"data": GOOD})), [], ["{file}", "expected a JSON list"]),
    ("scalar-not-list", _file("a.json", "42"), [], ["{file}", "expected a JSON list"]),
    ("jsonl-corrupt-middle-line",
     _file("a.jsonl", "".join(_JSONL_LINES[:3]) + '{"instruction": "x", "output"\n' + "".join(_JSONL_LINES[3:])),
     [], ["{file}", "row 3 (line 4)", "not valid JSON"]),
    ("json-lines-saved-as-json", _file("a.json", _JSONL), [], ["{file}", "rename the file to .jsonl"]),
    ("missing-output", _pool("a.json", _with(output=...)), [], ["{file}", "row 3", "field 'output'", "missing"]),
    ("missing-instruction", _pool("a.jsonl", _with(instruction=...)), [],
     ["{file}", "row 3", "field 'instruction'", "missing"]),
    ("output-is-a-number", _pool("a.json", _with(output=42)), [], ["{file}", "row 3", "field 'output'", "int"]),
    ("instruction-is-null", _pool("a.json", _with(instruction=None)), [],
     ["{file}", "row 3", "field 'instruction'", "null"]),
    ("input-is-nested", _pool("a.json", _with(input={"text": "x"})), [],
     ["{file}", "row 3", "field 'input'", "dict"]),
    ("output-is-a-list", _pool("a.jsonl", _with(output=["a", "b"])), [],
     ["{file}", "row 3", "field 'output'", "list"]),
    ("output-is-a-bool", _pool("a.json", _with(output=True)), [], ["{file}", "row 3", "field 'output'", "bool"]),
    ("empty-instruction", _pool("a.json", _with(instruction="")), [],
     ["{file}", "row 3", "field 'instruction'", "empty"]),
    ("empty-output", _pool("a.json", _with(output="")), [], ["{file}", "row 3", "field 'output'", "empty"]),
    ("whitespace-only-output", _pool("a.json", _with(output=" \n\t ")), [],
     ["{file}", "row 3", "field 'output'", "whitespace-only"]),
    ("row-not-an-object", _file("a.jsonl", "".join(_JSONL_LINES[:3]) + "[1, 2]\n" + "".join(_JSONL_LINES[3:])), [],
     ["{file}", "row 3", "expected a JSON object"]),
    ("non-utf8-jsonl", _file("a.jsonl", "".join(_JSONL_LINES[:3]).encode() + b'{"instruction": "caf\xe9", '
                             b'"output": "y"}\n' + "".join(_JSONL_LINES[4:]).encode()), [],
     ["{file}", "row 3 (line 4)", "not valid UTF-8"]),
    ("non-utf8-json", _file("a.json", json.dumps(GOOD).encode().replace(b"Task 2", b"Task \xff2")), [],
     ["{file}", "not valid UTF-8", "byte offset"]),
    ("empty-file", _file("a.jsonl", "\n\n"), [], ["{file}", "empty file"]),
    ("nested-too-deeply", _file("a.json", "[" * 100_000 + "]" * 100_000), [], ["{file}", "nested too deeply"]),
    ("unknown-schema", _pool("a.json", [{"question": "q", "answer": "a"}] * 3), [], ["{file}", "unknown schema"]),
    ("one-row", _pool("a.json", GOOD[:1]), [], ["{file}", "at least 2 rows", "got 1"]),
    ("limit-leaves-one-row", _pool("a.json", GOOD), ["--limit", "1"], ["{file}", "at least 2 rows"]),
    ("data-file-not-found", lambda root: root / "missing.json", [], ["{file}", "file not found"]),
    ("model-path-does-not-exist", _pool("a.json", GOOD), ["--model", "/nonexistent/models/gemma"],
     ["/nonexistent/models/gemma", "neither a built-in name"]),
    ("model-dir-without-config", _pool("a.json", GOOD), ["--model", "{root}"], ["not a model directory"]),
    ("gguf-that-is-not-gguf", _pool_beside({"m.gguf": "garbage"}), ["--model", "{root}/m.gguf"],
     ["m.gguf: not a model that can be loaded", "GGUF"]),
    ("model-of-an-unknown-type", _pool_beside({"m/config.json": '{"model_type": "nosuchtype"}'}),
     ["--model", "{root}/m"], ["/m: not a model that can be loaded"]),
    ("cuda-requested-without-gpu", _pool("a.json", GOOD), ["--device", "cuda"], ["--device 'cuda'", "0 cuda device"]),
    ("device-this-machine-lacks", _pool("a.json", GOOD), ["--device", "mps"], ["--device 'mps'", "0 mps device"]),
    ("meta-device-computes-nothing", _pool("a.json", GOOD), ["--device", "meta"], ["--device 'meta'", "0 meta device"]),
    ("not-a-device", _pool("a.json", GOOD), ["--device", "gpu"], ["--device 'gpu'", "not a torch device"]),
]


@pytest.mark.parametrize("name, make, extra, fragments", SCORE_ERRORS, ids=[c[0] for c in SCORE_ERRORS])
def test_score_refuses_bad_input_cleanly(cli, tmp_path, name, make, extra, fragments):
    import torch

    if (backend := {"cuda-requested-without-gpu": torch.cuda, "device-this-machine-lacks": torch.mps}.get(name)) \
            and backend.is_available():
        pytest.skip("this machine has that device")
    (tmp_path / "in").mkdir()
    data = make(tmp_path / "in")
    before = digest(tmp_path / "in")
    extra = [a.replace("{root}", str(tmp_path / "in")) for a in extra]
    out = tmp_path / "out"
    args = ["score", "--data", data, "--out", out, *FAST, "--max-length", MAX_LENGTH]
    if "--model" in extra:
        args = [a for a in args if a not in ("--model", "tiny-random")]
    result = cli(*args, *extra)
    result.assert_clean_error(*[f.replace("{file}", str(data)) for f in fragments])
    assert digest(tmp_path / "in") == before  # the input is untouched
    assert not (out / "scores.jsonl").exists() and not (out / "manifest.json").exists()


def test_bad_flag_values_are_usage_errors(cli, base, tmp_path):
    for flag in ("--batch-size", "--chunk-rows", "--max-tokens-per-batch"):
        result = cli("score", "--data", base["data"], "--out", tmp_path / "x", *FAST, flag, "0")
        assert result.rc == 2 and "Traceback" not in result.stderr
        assert f"argument {flag}: expected a positive integer, got 0" in result.stderr
    for value in ("0", "1", "-3"):  # too short to hold one response token: refused before any model loads
        result = cli("score", "--data", base["data"], "--out", tmp_path / "x", *FAST, "--max-length", value)
        assert result.rc == 2 and "Traceback" not in result.stderr
        assert f"argument --max-length: {value} cannot hold a single response token" in result.stderr
    result = cli("score", "--data", base["data"], "--out", tmp_path / "x", *FAST, "--max-length", "long")
    assert result.rc == 2 and "argument --max-length: expected 'auto' or an integer, got 'long'" in result.stderr
    assert not (tmp_path / "x").exists()
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "half",
                 "--out", tmp_path / "s.json")
    assert result.rc == 2 and "argument --ratio: invalid float value: 'half'" in result.stderr


def test_chat_template_without_one_is_an_error_before_any_run_file(cli, base, tmp_path):
    result = cli("score", "--data", base["data"], "--out", tmp_path / "run", *FAST, "--template", "chat")
    result.assert_clean_error("tiny-random", "--template chat needs a chat template")
    assert not (tmp_path / "run" / "manifest.json").exists()  # no run left marked "running"
    result = cli("train", "--data", base["data"], "--out", tmp_path / "model", "--model", "tiny-random",
                 "--max-steps", "1", "--template", "chat")
    result.assert_clean_error("template 'chat' needs a tokenizer with a chat template")


def test_a_file_where_a_directory_is_needed_is_a_clear_error(cli, base, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = cli("train", "--data", base["data"], "--out", tmp_path / "taken", "--model", "tiny-random",
                 "--max-steps", "1")
    result.assert_clean_error("taken: File exists", "a file where a directory is needed")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_truncated_weights_file_is_a_clear_error(cli, base, tmp_path):
    from miwv_lib.data.models import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    result = cli("score", "--data", base["data"], "--out", tmp_path / "run", "--model", model, "--embedder", "self")
    result.assert_clean_error(str(model), "damaged or incomplete")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_row_the_embedder_gives_nan_is_a_clear_error_not_every_rows_neighbour(cli, base, tmp_path):
    """A NaN in row 4's embedding (here: a token only its instruction holds, its embedding weights NaN). argmax
    ranks NaN first, so row 4 once became every row's demonstration, and every MIWV still looked fine."""
    from safetensors.torch import load_file, save_file

    from miwv_lib.data.datasets import format_source_text
    from miwv_lib.data.models import build_tiny_model, load_model

    model = build_tiny_model(tmp_path / "model")
    tokenizer, rows = load_model(str(model), dtype="float32").tokenizer, base_rows()
    tokens = [set(tokenizer(format_source_text(r), split_special_tokens=True).input_ids) for r in rows]
    only_row_4 = tokens[4].difference(*tokens[:4], *tokens[5:])
    assert only_row_4
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][sorted(only_row_4)] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    result = cli("score", "--data", base["data"], "--out", tmp_path / "run", "--model", model, "--embedder", "self",
                 "--dtype", "float32")
    result.assert_clean_error("--embedder self", f"{base['data']}, row 4 (id", "not finite")
    assert not (tmp_path / "run" / "scores.jsonl").exists() and not (tmp_path / "run" / "neighbors.json").exists()


def test_a_max_length_beyond_the_context_window_is_refused_before_any_run_file(cli, base, tmp_path):
    """Positions past the window give losses that look like any other: tiny-random's window is 2048 tokens."""
    result = cli("score", "--data", base["data"], "--out", tmp_path / "run", *FAST, "--max-length", "4096")
    result.assert_clean_error("tiny-random", "--max-length 4096 is beyond the model's context window (2048 tokens)")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_score_refuses_data_that_is_a_file_its_own_run_writes(cli, tmp_path):
    run = tmp_path / "run"
    data = write_rows(run / "scores.jsonl", base_rows())
    before = digest(run)
    result = cli("score", "--data", data, "--out", run, *FAST)
    result.assert_clean_error("scores.jsonl", "is a file the run in", "refusing to overwrite an input")
    assert digest(run) == before


def test_score_without_data_scores_the_default_dataset(cli, tmp_path, shared_data_dir):
    result = cli("score", "--data-dir", shared_data_dir, "--limit", "3", "--out", tmp_path / "run", *FAST)
    assert result.rc == 0, result.stderr[-2000:]
    assert len((tmp_path / "run" / "scores.jsonl").read_text().splitlines()) == 3


def test_select_warns_when_no_manifest_can_vouch_for_the_scores(cli, base, tmp_path):
    (tmp_path / "lone").mkdir()
    shutil.copy(base["scores"], tmp_path / "lone" / "scores.jsonl")
    result = cli("select", "--data", base["data"], "--scores", tmp_path / "lone" / "scores.jsonl", "--ratio", "0.5",
                 "--out", tmp_path / "s.json")
    assert result.rc == 0, result.stderr[-2000:]
    assert "warning:" in result.stderr and "manifest.json is missing" in result.stderr


def test_an_unknown_judge_is_a_usage_error_before_any_work(cli, base, tmp_path):
    result = cli("evaluate", "--data", base["data"], "--run-dir", base["run"], "--ratio", "0.5", "--judge", "gpt5")
    result.assert_clean_error("argument --judge", "got 'gpt5'")


@pytest.mark.parametrize("delay", [0.3, 1.0, 1.3, 2.5])
def test_ctrl_c_at_any_moment_of_start_up_prints_no_traceback(cli_env, base, tmp_path, delay):
    process = subprocess.Popen([sys.executable, "-m", "miwv_lib", "score", "--data", str(base["data"]), "--out",
                                str(tmp_path / "run"), *FAST], env=cli_env, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (130, 0, -signal.SIGINT), stderr  # 0: it finished first; -2: before Python's handler
    assert "Traceback" not in stderr, stderr
    if process.returncode == 130:
        assert stderr.strip().splitlines()[-1].startswith("interrupted"), stderr


def test_ctrl_c_while_a_finished_run_shuts_down_leaves_it_a_success(cli_env, base, tmp_path):
    """After its last line the interpreter takes a second or more to shut down (torch's finalizers); a Ctrl-C
    late in it killed the process with SIGINT's default handler (exit -2): a finished run reported as failed."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "miwv_lib", "score", "--data", str(base["data"]), "--out",
                                    str(out), *FAST], env={**cli_env, "PYTHONUNBUFFERED": "1"},
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout.readline().startswith("scored"), log.read_text()  # the command's last words
        time.sleep(0.2)  # past the command's return; then Ctrl-C, again and again, until the process has gone
        while process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.02)
    assert process.returncode == 0 and "Traceback" not in log.read_text(), (process.returncode, log.read_text())
    assert len(read_jsonl(out / "scores.jsonl")) == len(read_jsonl(base["scores"]))


# (case id, how to make the arguments from the base run and a scratch dir, fragments; "{x}" names base/scratch paths)
def _other_pool(rows) -> callable:
    return lambda base, tmp: ["--data", write_rows(tmp / "other.json", rows), "--scores", base["scores"]]


def _same_ids_other_text(base, tmp):
    # Another dataset that reuses the scored rows' ids: only the run's manifest can tell them apart.
    ids = [s["id"] for s in read_jsonl(base["scores"])]
    rows = [{"id": i, "instruction": f"Other task {n}", "input": "", "output": "other"} for n, i in enumerate(ids)]
    return ["--data", write_rows(tmp / "other.json", rows), "--scores", base["scores"]]


def _scores_copy(edit) -> callable:
    def make(base, tmp):
        text = base["scores"].read_text()
        path = tmp / "elsewhere" / "scores.jsonl"
        path.parent.mkdir()
        path.write_text(edit(text))
        return ["--data", base["data"], "--scores", path]

    return make


def _no_finite_miwv(text: str) -> str:
    return "".join(json.dumps({**json.loads(line), "miwv": None}) + "\n" for line in text.splitlines())


SELECT_ERRORS = [
    ("ratio-zero", lambda b, t: ["--ratio", "0"], ["ratio must be in (0, 1]", "0.0"]),
    ("ratio-negative", lambda b, t: ["--ratio", "-0.5"], ["ratio must be in (0, 1]", "-0.5"]),
    ("ratio-above-one", lambda b, t: ["--ratio", "1.5"], ["ratio must be in (0, 1]", "1.5"]),
    ("ratio-nan", lambda b, t: ["--ratio", "nan"], ["ratio must be in (0, 1]"]),
    ("ratio-selects-zero-rows", lambda b, t: ["--ratio", "0.05"],
     ["ratio 0.05 of 14 rows selects zero rows", "smallest useful ratio is 0.07143"]),
    ("scores-of-a-smaller-dataset", _other_pool(base_rows()[:-1]), ["{scores}", "has 14 rows but the data has 13"]),
    ("scores-of-another-dataset", _other_pool([*base_rows()[:5], {**base_rows()[5], "output": "changed"},
                                               *base_rows()[6:]]),
     ["{scores}", "row 5, field 'id'", "belong to another dataset"]),
    ("scores-of-other-data-with-the-same-ids", _same_ids_other_text, ["{scores}", "computed on other data"]),
    ("scores-file-torn", _scores_copy(lambda text: text[: len(text) - 40]), ["scores.jsonl, row 13 (line 14)",
                                                                            "not valid JSON"]),
    ("scores-file-not-json", _scores_copy(lambda text: "id,miwv\nabc,0.1\n"), ["scores.jsonl, row 0 (line 1)"]),
    ("scores-file-missing", lambda b, t: ["--scores", t / "nope" / "scores.jsonl"], ["scores file not found"]),
    ("scores-is-the-run-directory", lambda b, t: ["--scores", b["run"]], ["is a directory", "scores.jsonl inside it"]),
    ("scores-without-finite-miwv", _scores_copy(_no_finite_miwv), ["only 0 rows have a finite 'miwv'"]),
    ("out-is-the-data-file", lambda b, t: ["--out", b["data"]], ["is the --data file", "refusing to overwrite"]),
    ("out-is-the-runs-manifest", lambda b, t: ["--out", b["run"] / "manifest.json"],
     ["manifest.json is a file of the run that", "refusing to overwrite it"]),
    ("out-is-parquet", lambda b, t: ["--out", t / "subset.parquet"], ["subset.parquet", ".json (a list of rows)"]),
    ("out-has-no-suffix", lambda b, t: ["--out", t / "subset"], ["subset: a subset is written as .json"]),
    ("scores-edited-after-score", lambda b, t: ["--scores", _edited_run(b, t)],
     ["scores.jsonl was changed after 'score' wrote it", "manifest.json"]),
    ("scores-of-an-unfinished-run", lambda b, t: ["--scores", _partial_scores(b, t)],
     ["scores.partial.jsonl holds the finished chunks of an unfinished run", "run the same 'score' command"]),
]


def _edited_run(base, tmp) -> Path:
    """A copy of the finished run whose scores.jsonl was edited by hand: one row's MIWV made the largest."""
    run = tmp / "edited"
    shutil.copytree(base["run"], run)
    rows = read_jsonl(run / "scores.jsonl")
    rows[7]["miwv"] = 9.0
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run / "scores.jsonl"


def _partial_scores(base, tmp) -> Path:
    run = tmp / "unfinished"
    run.mkdir()
    (run / "scores.partial.jsonl").write_text(base["scores"].read_text())
    return run / "scores.partial.jsonl"


@pytest.mark.parametrize("name, make, fragments", SELECT_ERRORS, ids=[c[0] for c in SELECT_ERRORS])
def test_select_refuses_bad_input_cleanly(cli, base, tmp_path, name, make, fragments):
    given = make(base, tmp_path)
    args = {"--data": base["data"], "--scores": base["scores"], "--ratio": "0.5", "--out": tmp_path / "subset.json"}
    for flag, value in zip(given[::2], given[1::2]):
        args[flag] = value
    out = Path(args["--out"])
    if not out.exists():
        out.write_text("an earlier subset\n")  # a failed select must not replace it
    watched = [base["root"], tmp_path]
    before = digest(*watched)
    result = cli("select", *[str(x) for pair in args.items() for x in pair])
    result.assert_clean_error(*[f.replace("{scores}", str(args["--scores"])) for f in fragments])
    assert digest(*watched) == before


def test_run_directory_refuses_another_configuration_unless_overwrite(cli, base, tmp_path):
    before = digest(base["run"])
    result = cli("score", "--data", base["data"], "--out", base["run"], *FAST, "--max-length", "128")
    result.assert_clean_error(str(base["run"]), "different configuration", "max_length: 256 -> 128", "--overwrite")
    assert digest(base["run"]) == before  # the earlier results are untouched

    run = shutil.copytree(base["run"], tmp_path / "run")
    result = cli("score", "--data", base["data"], "--out", run, *FAST, "--max-length", "128", "--overwrite")
    assert result.rc == 0, result.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["fingerprint_inputs"]["max_length"] == 128 and manifest["rows"] == 14


def test_unreadable_manifest_is_refused_not_a_crash(cli, base, tmp_path):
    run = shutil.copytree(base["run"], tmp_path / "run")
    (run / "manifest.json").write_text('{"status": "comp')
    before = digest(run)
    result = cli("score", "--data", base["data"], "--out", run, *FAST, "--max-length", MAX_LENGTH)
    result.assert_clean_error("manifest.json is unreadable", "--overwrite")
    assert digest(run) == before


def test_scores_from_another_configuration_of_the_same_data_are_accepted(cli, base, tmp_path):
    # select only needs scores *of this data*; which model or template produced them is the user's choice
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.5",
                 "--out", tmp_path / "s.jsonl")
    assert result.rc == 0, result.stderr[-3000:]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 7


# --------------------------------------------------------------------------- rows that are flagged, not refused


def test_too_long_response_is_cut_identically_and_flagged(base):
    scores = read_jsonl(base["scores"])
    long_row = scores[4]
    assert long_row["truncated"] is True
    # the response alone does not fit: it is cut from the right so that [BOS] + response + EOS = max_length
    assert long_row["truncation"]["response"] == long_row["response_tokens"] + 1 - (MAX_LENGTH - 1)
    assert long_row["one_shot_tokens"] == MAX_LENGTH
    assert all(math.isfinite(long_row[k]) for k in ("zero_shot_loss", "ifd"))
    # nothing of the demonstration fits beside it: no one-shot loss, no MIWV (not a false 0.0), and it says why
    assert long_row["truncation"]["demo"] == "all" and long_row["status"] == "no-demo"
    assert long_row["one_shot_loss"] is None and long_row["miwv"] is None
    assert all("response" not in s["truncation"] for s in scores if s["index"] != 4)
    assert all(s["status"] == "ok" and math.isfinite(s["miwv"]) for s in scores if s["index"] != 4)
    manifest = json.loads((base["run"] / "manifest.json").read_text())
    assert manifest["truncated_rows"] == sum(s["truncated"] for s in scores) >= 1
    assert manifest["no_miwv_rows"] == 1 and manifest["max_length"] == MAX_LENGTH
    assert "flagged 'truncated'" in base["result"].stderr
    assert "warning: 1 rows have no MIWV" in base["result"].stderr and "[4]" in base["result"].stderr


def test_a_row_whose_demo_cannot_fit_is_never_selected(cli, base, tmp_path):
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "1", "--out", tmp_path / "a.json")
    result.assert_clean_error("only 13 rows have a finite 'miwv'; cannot select 14")
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.9",
                 "--out", tmp_path / "b.json")
    assert result.rc == 0, result.stderr[-3000:]
    chosen = [r["miwv_selection"]["index"] for r in json.loads((tmp_path / "b.json").read_text())]
    assert len(chosen) == 12 and 4 not in chosen


def test_max_length_too_small_for_any_demo_leaves_every_row_without_miwv(cli, base, tmp_path):
    run = tmp_path / "run"
    result = cli("score", "--data", base["data"], "--out", run, *FAST, "--max-length", "2")
    assert result.rc == 0, result.stderr[-3000:]
    scores = read_jsonl(run / "scores.jsonl")
    assert all(s["miwv"] is None and s["status"] == "no-demo" for s in scores)  # never 0.0
    assert "warning: 14 rows have no MIWV" in result.stderr and "no finite MIWV" in result.stdout
    select = cli("select", "--data", base["data"], "--scores", run / "scores.jsonl", "--ratio", "0.5",
                 "--out", tmp_path / "s.json")
    select.assert_clean_error("only 0 rows have a finite 'miwv'")


def test_default_max_length_cuts_nothing(cli, base, tmp_path):
    run = tmp_path / "run"
    result = cli("score", "--data", base["data"], "--out", run, *FAST)
    assert result.rc == 0, result.stderr[-3000:]
    scores = read_jsonl(run / "scores.jsonl")
    assert not any(s["truncated"] for s in scores) and all(s["status"] == "ok" for s in scores)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["max_length"] == "auto"
    assert manifest["max_length"] == max(s["one_shot_tokens"] for s in scores) > MAX_LENGTH
    # no warning about cut rows (the base pool's duplicate rows still get their DataWarning)
    assert not [line for line in result.stderr.splitlines() if line.startswith("warning:") and "Data" not in line]


def test_exact_duplicates_are_scored_and_reported(base):
    result = base["result"]
    assert "Traceback" not in result.stderr
    assert "DataWarning" in result.stderr and "[2, 13]" in result.stderr  # the warning names the rows
    scores = read_jsonl(base["scores"])
    assert len(scores) == 14 and scores[2]["id"] == scores[13]["id"]
    assert scores[2]["neighbor_index"] == 13 and scores[13]["neighbor_index"] == 2
    assert scores[2]["neighbor_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_forked_runner_matches_a_plain_subprocess(cli, cli_env, base, tmp_path):
    """The table's forked processes behave like ``python -m miwv_lib``: same exit code, stdout and stderr
    (warnings included). The success path is compared in the kill test (a plain run against a forked one)."""
    args = ["select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.05", "--out", tmp_path / "s.json"]
    forked = cli(*args)
    plain = subprocess.run([sys.executable, "-m", "miwv_lib", *map(str, args)], capture_output=True, text=True,
                           env=cli_env, cwd=REPO, timeout=300)
    assert (forked.rc, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert forked.rc == 2 and "DataWarning" in forked.stderr and "error: ratio 0.05" in forked.stderr


# --------------------------------------------------------------------------- a killed job


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_file(cli, cli_env, tmp_path):
    """SIGKILL a real ``python -m miwv_lib score`` mid-run, tear its last append, re-run the same command."""
    data = write_rows(tmp_path / "pool.jsonl", make_rows(300, seed=3))
    # Batches of 16 sequences span a chunk (5 rows x 3 passes): scoring rows in other company would change
    # their float32 bits, so byte-identity after a torn append needs the torn chunk to be scored whole again.
    args = ["score", "--data", str(data), *FAST, "--max-length", str(MAX_LENGTH), "--chunk-rows", "5"]
    reference = cli(*args, "--out", tmp_path / "clean")
    assert reference.rc == 0, reference.stderr[-3000:]

    run = tmp_path / "run"
    partial = run / "scores.partial.jsonl"
    command = [sys.executable, "-m", "miwv_lib", *args, "--out", str(run)]
    with open(tmp_path / "killed.err", "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=cli_env, cwd=REPO)
        deadline = time.monotonic() + 180
        while not (partial.exists() and partial.read_bytes().count(b"\n") >= 20):  # 4 chunks done
            assert process.poll() is None, "exited before it could be killed: " + (tmp_path / "killed.err").read_text()
            assert time.monotonic() < deadline, "no progress: " + (tmp_path / "killed.err").read_text()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "scores.jsonl").exists()  # nothing that looks finished
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    lines = partial.read_bytes().split(b"\n")[:-1]
    assert 20 <= len(lines) < 300
    # A crash can tear the last append anywhere: keep 2 full lines of the last chunk, and half of the third.
    kept = len(lines) - len(lines) % 5 - 5 + 2  # rows on whole lines
    torn = b"\n".join(lines[:kept]) + b"\n" + lines[kept][: len(lines[kept]) // 2]
    partial.write_bytes(torn)

    resumed = subprocess.run(command, capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "scores.jsonl").read_bytes() == (tmp_path / "clean" / "scores.jsonl").read_bytes()
    scores = read_jsonl(run / "scores.jsonl")
    assert [s["index"] for s in scores] == list(range(300))  # none missing, none twice
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["rows_resumed"] == kept > 0 and manifest["rows_scored_this_run"] == 300 - kept
    assert not partial.exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_second_process_on_the_same_run_directory_is_refused(cli, base, tmp_path):
    from miwv_lib.runtime.runs import run_lock

    run = tmp_path / "busy"
    with run_lock(run):  # this test's process holds the directory, as a live scoring run would
        result = cli("score", "--data", base["data"], "--out", run, *FAST)
    result.assert_clean_error(str(run), f"another process (pid {os.getpid()}")
    assert not (run / "manifest.json").exists()
    with run_lock(run):  # released: the directory can be taken again
        pass


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from miwv_lib.experiments import cli as cli_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "score_pool", interrupted)
    data, run = write_rows(tmp_path / "pool.json", GOOD), tmp_path / "run"
    argv = ["score", "--data", str(data), "--out", str(run), *FAST]
    assert cli_module.main(argv) == 130
    assert capsys.readouterr().err == "interrupted\n"  # before the first chunk: nothing to resume from
    run.mkdir(exist_ok=True)
    (run / "scores.partial.jsonl").write_text("", encoding="utf-8")
    assert cli_module.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "run the same command again to resume" in err and "scores.partial.jsonl" in err


# --------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("det") / "pool.jsonl", make_rows(40, seed=9))


def _score(cli, data, out, *extra) -> bytes:
    result = cli("score", "--data", data, "--out", out, *FAST[:4], "--max-length", MAX_LENGTH, *extra)
    assert result.rc == 0, result.stderr[-3000:]
    return (Path(out) / "scores.jsonl").read_bytes()


def test_two_fresh_float32_runs_are_byte_identical(cli, small_pool, tmp_path):
    first = _score(cli, small_pool, tmp_path / "a", "--dtype", "float32")
    assert _score(cli, small_pool, tmp_path / "b", "--dtype", "float32") == first
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab"]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_two_fresh_bfloat16_runs_are_byte_identical_on_cpu(cli, small_pool, tmp_path):
    first = _score(cli, small_pool, tmp_path / "a", "--dtype", "bfloat16")
    assert _score(cli, small_pool, tmp_path / "b", "--dtype", "bfloat16") == first
    assert first != _score(cli, small_pool, tmp_path / "fp32", "--dtype", "float32")  # bf16 really was used


def test_batch_size_does_not_change_the_scores(cli, small_pool, tmp_path):
    one = read_jsonl_bytes(_score(cli, small_pool, tmp_path / "bs1", "--dtype", "float32", "--batch-size", "1"))
    many = read_jsonl_bytes(_score(cli, small_pool, tmp_path / "bs32", "--dtype", "float32", "--batch-size", "32"))
    for a, b in zip(one, many, strict=True):
        for key in ("zero_shot_loss", "one_shot_loss", "unconditional_loss", "miwv", "ifd"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["index"], key)
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
               {k: v for k, v in b.items() if not isinstance(v, float)}


def read_jsonl_bytes(blob: bytes) -> list[dict]:
    return [json.loads(line) for line in blob.decode().splitlines() if line.strip()]


def test_a_finished_run_whose_scores_lost_a_row_is_an_error_not_a_success(cli, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    lines = (run / "scores.jsonl").read_text().splitlines(keepends=True)
    (run / "scores.jsonl").write_text("".join(lines[:-1]))
    before = digest(run)
    result = cli("score", "--data", base["data"], "--out", run, *FAST, "--max-length", MAX_LENGTH)
    result.assert_clean_error(str(run / "scores.jsonl"), "was changed after the run finished", "--overwrite")
    assert digest(run) == before


def test_an_upper_case_jsonl_subset_is_jsonl(cli, base, tmp_path):
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.5",
                 "--out", tmp_path / "TOP.JSONL")
    assert result.rc == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "TOP.JSONL").read_text().splitlines()]
    assert len(rows) == 7 and load_instructions(tmp_path / "TOP.JSONL").rows[0]["instruction"] == rows[0]["instruction"]


def test_selection_output_is_reproducible_and_random_is_seeded(cli, base, tmp_path):
    def select(name, *extra) -> bytes:
        result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.5",
                     "--out", tmp_path / name, *extra)
        assert result.rc == 0, result.stderr[-3000:]
        return (tmp_path / name).read_bytes()

    assert select("a.json") == select("b.json")
    assert select("r3a.json", "--by", "random", "--seed", "3") == select("r3b.json", "--by", "random", "--seed", "3")
    assert select("r3a.json", "--by", "random", "--seed", "3") != select("r4.json", "--by", "random", "--seed", "4")


def test_a_subset_edited_by_hand_is_refused_until_its_checksum_is_removed(cli, base, tmp_path):
    """'select' records the subset's sha256 beside it (``sha256sum`` format); training on a copy changed since is
    one clear error, before any model loads; deleting the checksum makes the edited file the user's own data."""
    out, sidecar = tmp_path / "top.json", tmp_path / "top.json.sha256"
    result = cli("select", "--data", base["data"], "--scores", base["scores"], "--ratio", "0.5", "--out", out)
    assert result.rc == 0, result.stderr[-3000:]
    assert sidecar.read_text() == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  top.json\n"
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", sidecar.name], cwd=tmp_path, check=True)
    train = ("train", "--data", out, "--out", tmp_path / "model", "--model", "tiny-random")
    intact = cli(*train, "--epochs", "0")  # an intact subset gets as far as the flags (0 epochs is refused)
    assert intact.rc == 2 and "epochs" in intact.stderr and "top.json" not in intact.stderr, intact.stderr[-3000:]
    rows = json.loads(out.read_text())
    rows[0]["output"] = "Edited by hand."
    out.write_text(json.dumps(rows))
    result = cli(*train)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.rc == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{out}: changed after it was written" in errors[0] and "delete top.json.sha256" in errors[0]
    assert not (tmp_path / "model").exists()
    sidecar.unlink()
    assert load_instructions(out).rows[0]["output"] == "Edited by hand."


# --------------------------------------------------------------------------- properties of the loaders

_FIELDS = ("instruction", "input", "output")
_non_strings = st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2))


def _load(tmp: str, name: str, content: bytes):
    path = Path(tmp) / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return path, load_instructions(path)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_jsonl_corrupt_line_anywhere_reports_that_exact_row_and_line(n, data):
    rows = [json.dumps(r) for r in make_rows(n, seed=n)]
    bad_row = data.draw(st.integers(0, n - 1), label="bad_row")
    corrupt = data.draw(st.sampled_from(['{"instruction": "x", "output": ', "not json", '{"a": 1}}', "[1, 2", "}"]))
    rows[bad_row] = corrupt
    blanks = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="blank line before row")
    lines = []
    for blank, row in zip(blanks, rows):
        lines += ["", row] if blank else [row]
    line_of_bad = lines.index(corrupt) + 1
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(DataError) as info:
        _load(tmp, "pool.jsonl", ("\n".join(lines) + "\n").encode())
    assert (info.value.row, info.value.line) == (bad_row, line_of_bad)
    assert f"pool.jsonl, row {bad_row} (line {line_of_bad})" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), data=st.data())
def test_a_bad_value_anywhere_names_its_row_and_field(n, data):
    rows = make_rows(n, seed=n)
    bad_row = data.draw(st.integers(0, n - 1), label="bad_row")
    field = data.draw(st.sampled_from(_FIELDS), label="field")
    rows[bad_row][field] = data.draw(_non_strings, label="value")
    fmt = data.draw(st.sampled_from(["json", "jsonl"]), label="format")
    content = json.dumps(rows) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(DataError) as info:
        _load(tmp, f"pool.{fmt}", content.encode())
    assert (info.value.row, info.value.field) == (bad_row, field)
    assert f"row {bad_row}" in str(info.value) and f"field '{field}'" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), data=st.data())
def test_non_utf8_bytes_in_any_jsonl_row_name_that_row(n, data):
    rows = [json.dumps(r).encode() for r in make_rows(n, seed=n)]
    bad_row = data.draw(st.integers(0, n - 1), label="bad_row")
    at = data.draw(st.integers(1, len(rows[bad_row]) - 1), label="offset")
    rows[bad_row] = rows[bad_row][:at] + data.draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe9", b"\x80"])) + \
        rows[bad_row][at:]
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(DataError) as info:
        _load(tmp, "pool.jsonl", b"\n".join(rows) + b"\n")
    assert info.value.row == bad_row and "not valid UTF-8" in str(info.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=300),
                         st.text(alphabet='{}[]",:0123456789 \n\tabc\\nul', max_size=200).map(str.encode)),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_the_loader_never_fails_with_anything_but_a_data_error(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, pool = _load(tmp, "pool" + suffix, content)
        except DataError as exc:
            assert "pool" + suffix in str(exc)
        else:
            assert len(pool) >= 1 and all(isinstance(r[k], str) for r in pool.rows for k in (*_FIELDS, "id"))


# --------------------------------------------------------------------------- properties of the selection rule


def _scores(values: list[float | None], ids: list[str]) -> list[dict]:
    def finite(v):
        return v is not None and math.isfinite(v)

    return [{"index": i, "id": ids[i], "miwv": v, "ifd": v / 3 if finite(v) else None,
             "response_tokens": int(abs(v) * 10) if finite(v) else None} for i, v in enumerate(values)]


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0, None, math.nan]), min_size=1, max_size=40),
       ratio=st.floats(0.01, 1.0), by=st.sampled_from(["miwv", "low-miwv", "ifd", "length"]), data=st.data())
def test_selection_is_invariant_to_the_order_of_the_input(values, ratio, by, data):
    ids = [f"id-{n:03d}" for n in data.draw(st.permutations(range(len(values))), label="ids")]
    order = data.draw(st.permutations(range(len(values))), label="order")
    scores, shuffled = _scores(values, ids), _scores([values[j] for j in order], [ids[j] for j in order])
    try:
        chosen = [scores[i]["id"] for i in select_indices(scores, ratio, by)]
    except SelectionError:
        with pytest.raises(SelectionError):
            select_indices(shuffled, ratio, by)
        return
    assert [shuffled[i]["id"] for i in select_indices(shuffled, ratio, by)] == chosen  # same rows, same ranks


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 100_000), data=st.data())
def test_subset_size_is_floor_of_ratio_times_n(n, data):
    k = data.draw(st.integers(1, n), label="k")
    assert subset_size(n, k / n) == k  # the ratio a user types for "k of n rows"
    ratio = data.draw(st.floats(min_value=1 / n, max_value=1.0), label="ratio")
    exact = Fraction(ratio) * n  # the real product, no rounding
    size = subset_size(n, ratio)
    assert size == math.floor(exact) or (size == math.floor(exact) + 1 and math.ceil(exact) - exact < 1e-9)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 200), ratio=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_random_baseline_is_a_seeded_subset_of_the_right_size(n, ratio, seed):
    scores = _scores([0.0] * n, [str(i) for i in range(n)])
    assume(math.floor(ratio * n + 1e-9) > 0)
    chosen = select_indices(scores, ratio, "random", seed=seed)
    assert chosen == select_indices(scores, ratio, "random", seed=seed)
    assert len(chosen) == len(set(chosen)) == subset_size(n, ratio) and set(chosen) <= set(range(n))


# --------------------------------------------------------------------------- properties of the run files


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6), data=st.data())
def test_partial_results_keep_exactly_the_whole_lines_after_a_tear_anywhere(sizes, data):
    with tempfile.TemporaryDirectory() as tmp:
        partial = PartialResults(Path(tmp) / "scores.partial.jsonl")
        rows, start = [], 0
        for size in sizes:
            chunk = [{"index": i, "id": f"r{i}", "miwv": i / 7, "text": "é" * (i % 3)}
                     for i in range(start, start + size)]
            partial.append(chunk)
            rows += chunk
            start += size
        blob = partial.path.read_bytes()
        cut = data.draw(st.integers(0, len(blob)), label="cut")
        partial.path.write_bytes(blob[:cut])
        loaded = partial.load()
        whole, end, boundary = [], 0, 0
        for row in rows:  # the rows whose line, newline included, survived the cut
            end += len((json.dumps(row, ensure_ascii=False) + "\n").encode())
            if end <= cut:
                whole, boundary = whole + [row], end
        assert loaded == {r["index"]: r for r in whole}
        assert partial.path.stat().st_size == boundary  # the torn tail is cut off
        partial.append([r for r in rows if r["index"] not in loaded])  # so appending the rest gives everything
        assert partial.load() == {r["index"]: r for r in rows}


def test_a_damaged_line_inside_the_partial_file_is_skipped_not_fatal(tmp_path):
    partial = PartialResults(tmp_path / "scores.partial.jsonl")
    partial.append([{"index": 0}, {"index": 1}])
    with open(partial.path, "ab") as handle:
        handle.write(b'{"index": 2, "mi\xff\n[1, 2]\n')
    partial.append([{"index": 3}])
    with pytest.warns(RuntimeWarning, match="2 damaged lines"):
        assert sorted(partial.load()) == [0, 1, 3]


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=80), overwrite=st.booleans())
def test_a_damaged_manifest_is_refused_or_overwritten_never_a_crash(content, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_bytes(content)
        try:
            previous = check_fingerprint(path, "abc", {"max_length": 1}, overwrite=overwrite)
        except FingerprintMismatch as exc:
            assert not overwrite and str(Path(tmp)) in str(exc)
        else:
            assert previous is None or previous.get("fingerprint") == "abc"


@settings(max_examples=80, deadline=None)
@given(content=st.one_of(st.binary(max_size=120), st.text(alphabet='{}[]",:0123456789 \nabc', max_size=120)
                         .map(str.encode)))
def test_a_damaged_scores_file_is_a_selection_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.jsonl"
        path.write_bytes(content)
        try:
            rows = load_scores(path)
        except SelectionError as exc:
            assert str(path) in str(exc)
        else:
            assert rows and all(isinstance(r, dict) for r in rows)
