"""A fuzzer of our own: generated bad input against the README's promise, through the command line.

Every generated case asserts one contract: exit 0 with correct output, or exit 2 with exactly one line
starting ``error:`` that names what is wrong; no traceback; inputs and earlier results byte-unchanged.

Four families: malformed pool files, flag values drawn from the configuration schema (and the parser's
other flags), study and pipeline YAML configs mutated key by key, and faults injected into a finished run
directory (torn, edited or missing files, a read-only directory, a full disk). Most cases call
``miwv_lib.experiments.cli.main`` in this process (a subprocess costs seconds of imports); a handful run
``python -m miwv_lib`` end to end. Work that would load a model for training or evaluation is stopped
at its door (``_WorkStarted``): a flag value that gets that far was accepted.

Profiles: the default runs in about a minute; ``MIWV_FUZZ_PROFILE=long`` runs ten times as many cases.
The number of generated cases is printed in pytest's summary (``fuzz cases run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import given
from hypothesis import strategies as st

from conftest import FUZZ_CASES, make_rows
from miwv_lib.experiments import cli
from miwv_lib.data.datasets import DataError, DataWarning, load_instructions

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random", "--embedder", "self", "--dtype", "float32", "--max-length", "256"]

settings.register_profile("miwv-fuzz", deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("miwv-fuzz-long", deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
LONG = os.environ.get("MIWV_FUZZ_PROFILE", "default") == "long"
_PROFILE = settings.get_profile("miwv-fuzz-long" if LONG else "miwv-fuzz")


def fuzz(examples: int) -> settings:
    """The profile's settings with ``examples`` cases (ten times as many in the long profile)."""
    return settings(_PROFILE, max_examples=examples * (10 if LONG else 1))


# --------------------------------------------------------------------------- the contract


@dataclass
class Outcome:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


class _WorkStarted(Exception):
    """Raised where a command would start real work (load a model to train or evaluate)."""


def run_main(argv: list) -> Outcome:
    """``miwv *argv`` in this process; an exception escaping ``main`` is what a user sees as a traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except _WorkStarted:
            rc = -1
        except BaseException:  # noqa: BLE001 - the contract's failure: a traceback
            stderr.write("Traceback (most recent call last):\n" + traceback.format_exc())
            rc = 1
    return Outcome(rc, stdout.getvalue(), stderr.getvalue())


def digest(*paths: Path) -> dict[str, str]:
    out = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.exists() and not file.name.startswith(".lock"):
                out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def check_contract(outcome: Outcome, *, names: tuple[str, ...] = (), allow_work: bool = False,
                   family: str = "") -> str:
    """``ok``, ``error`` or ``work`` (stopped at the door); fails the test on any broken promise."""
    FUZZ_CASES[family] += 1
    assert "Traceback" not in outcome.err + outcome.out, outcome.err[-4000:]
    if outcome.rc == -1:
        assert allow_work, "work started where it should not have"
        return "work"
    if outcome.rc == 0:
        return "ok"
    assert outcome.rc == 2, f"exit code {outcome.rc}: {outcome.err[-2000:]}"
    assert len(outcome.error_lines) == 1, outcome.err[-2000:]
    if names:
        assert any(name in outcome.error_lines[0] for name in names), (names, outcome.error_lines[0])
    return "error"


def strict_json(text: str):
    """Standard JSON only: NaN and Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- (a) malformed pool files

GOOD = make_rows(6, seed=3)
_RAW = "\x00RAW{}\x00"  # a placeholder for text that json.dumps cannot produce (NaN, a 5,000-digit integer)

raw_tokens = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-" + "1" * 4400,
                              "1" * 4300, "0.1e-400", "123456789012345678901234567890"])
special_strings = st.sampled_from(["", " ", "\n\t ", "\u2028", "</s>", "<eos>", "\x00", "\ufeff", "\ud800", "\udfff",
                                   "é" * 3, "😀", "a" * 5000, "null", "NaN", "{}", "[]", '"', "\\"])
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8), special_strings),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
field_values = st.one_of(json_values, raw_tokens.map(lambda t: (_RAW, t)))
fields_to_hit = st.sampled_from(["instruction", "input", "output", "id", "meta", "Instruction", "OUTPUT",
                                 "extra.nested"])


@st.composite
def pools(draw):
    """(file name, bytes): a valid pool with a few mutations of its rows, keys and bytes."""
    rows = [dict(r) for r in GOOD[: draw(st.integers(1, len(GOOD)))]]
    raws: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        action = draw(st.sampled_from(["set", "drop", "capitalise", "set", "nest"]))
        key = draw(fields_to_hit)
        if action == "drop":
            row.pop(draw(st.sampled_from(sorted(row))), None)
        elif action == "capitalise" and row:
            old = draw(st.sampled_from(sorted(row)))
            row[draw(st.sampled_from([old.capitalize(), old.upper()]))] = row.pop(old)
        else:
            value = draw(field_values)
            if isinstance(value, tuple):
                raws.append(value[1])
                value = _RAW.format(len(raws) - 1)
            row[key] = {"deep": value} if action == "nest" else value
    top = draw(st.sampled_from(["list", "list", "list", "object", "scalar", "jsonl", "jsonl", "empty"]))
    name = "pool.jsonl" if top == "jsonl" else "pool.json"
    if top == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=draw(st.booleans())) + "\n" for r in rows)
    elif top == "object":
        text = json.dumps({"data": rows})
    elif top == "scalar":
        text = json.dumps(draw(json_values))
    elif top == "empty":
        text = draw(st.sampled_from(["", "\n", "[]", "  \n\n"]))
    else:
        text = json.dumps(rows, ensure_ascii=draw(st.booleans()))
    for i, token in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), token)
    blob = text.encode("utf-8", "surrogatepass")
    if blob and draw(st.integers(0, 5)) == 0:  # bytes: not UTF-8, a BOM, or cut short
        at = draw(st.integers(0, len(blob)))
        blob = draw(st.sampled_from([blob[:at] + b"\xff\xfe" + blob[at:], b"\xef\xbb\xbf" + blob, blob[:at]]))
    return name, blob


def _loader_contract(path: Path):
    """The pool, whose every field is text that can be written back as standard JSON; or a DataError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            pool = load_instructions(path)
        except DataError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
            return None
    for row in pool.rows:
        assert all(isinstance(row[k], str) for k in ("id", "instruction", "input", "output"))
    strict_json(json.dumps(pool.records, ensure_ascii=False).encode("utf-8").decode())  # writable, standard JSON
    return pool


@fuzz(120)
@given(pool=pools())
def test_fuzz_the_loader_on_malformed_pools(pool):
    name, blob = pool
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        _loader_contract(path)
        FUZZ_CASES["pool files (loader)"] += 1


@fuzz(25)
@given(pool=pools(), ratio=st.sampled_from(["0.5", "1"]), out=st.sampled_from(["subset.json", "subset.jsonl"]))
def test_fuzz_score_and_select_on_malformed_pools(pool, ratio, out):
    """Through the CLI: a bad pool stops ``score`` before the model loads; a good one is scored and selected, and
    the subset is standard JSON that loads again."""
    name, blob = pool
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "in" / name
        data.parent.mkdir()
        data.write_bytes(blob)
        before = digest(data)
        result = run_main(["score", "--data", data, "--out", tmp / "run", *FAST])
        state = check_contract(result, names=(str(data),), family="pool files (score, select)")
        assert digest(data) == before
        if state == "error":
            assert not (tmp / "run" / "scores.jsonl").exists() and not (tmp / "run" / "manifest.json").exists()
            return
        selected = run_main(["select", "--data", data, "--scores", tmp / "run" / "scores.jsonl", "--ratio", ratio,
                             "--out", tmp / out])
        if check_contract(selected, names=("ratio",), family="pool files (score, select)") == "ok":
            text = (tmp / out).read_text(encoding="utf-8")
            strict_json(text) if out.endswith(".json") else [strict_json(line) for line in text.splitlines()]
            load_instructions(tmp / out)
        assert digest(data) == before


# --------------------------------------------------------------------------- (b) flag values from the schema

bad_texts = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "Infinity", "-1", "0", "-0", "1", "2", "0.5", "1.5", "1e400",
                     "-1e400", "1e-400", "9" * 5000, "99999999999999999999", "abc", "1,5", "0x10", "1_000", "١٢",
                     "true", "None", "null", "auto", "--", "-", "5.", "no/such/dir", "a/b", "x.parquet", "é", "😀",
                     "~nosuchuser/x.json"]),  # a home directory that cannot be found: not a RuntimeError
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))


def _flags(command: str) -> list[tuple[str, object]]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return [(a.option_strings[-1], a) for a in sub._actions
            if a.option_strings and a.nargs != 0 and a.dest not in ("help",)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished run of the tiny model on a 14-row pool: the earlier results every later case must not change."""
    root = tmp_path_factory.mktemp("fuzz-base")
    data = root / "pool.json"
    data.write_text(json.dumps(make_rows(14, seed=7), indent=1), encoding="utf-8")
    result = run_main(["score", "--data", data, "--out", root / "run", *FAST])
    assert result.rc == 0, result.err[-3000:]
    reference = root / "reference.json"
    assert run_main(["select", "--data", data, "--scores", root / "run" / "scores.jsonl", "--ratio", "0.5",
                     "--out", reference]).rc == 0
    return {"root": root, "data": data, "run": root / "run", "reference": reference}


@pytest.fixture
def no_work(monkeypatch):
    """Stop score, train and evaluate at the door of real work: a flag that gets there was accepted."""
    def door(*args, **kwargs):
        raise _WorkStarted

    monkeypatch.chdir(os.getcwd())  # restored afterwards: the test changes into its scratch directory
    monkeypatch.setenv("MIWV_CACHE_DIR", str(Path(tempfile.mkdtemp(prefix="fuzz-cache-"))))
    def offline(hub_id, **kwargs):  # a hub id among the values: as on a machine without the hub, at once
        raise DataError("could not load from the Hugging Face hub (offline in the fuzzer)", source=hub_id)

    import miwv_lib.data.datasets

    monkeypatch.setattr(miwv_lib.data.datasets, "_download_hub", offline)
    for work in ("score_pool", "train_model", "run_comparison"):  # the names the commands call
        monkeypatch.setattr(cli, work, door)


def _base_argv(command: str, base: dict, tmp: Path, by: str) -> dict:
    # ratio 0.3 (4 of 14 rows): the tiny random model gives 6 of them an IFD ≤ 1, all that --by ifd may take
    run, data = base["run"], base["data"]
    return {
        "score": {"--data": data, "--out": tmp / "run", "--model": "tiny-random", "--embedder": "self"},
        "select": {"--data": data, "--scores": run / "scores.jsonl", "--ratio": "0.3", "--out": tmp / "s.json",
                   "--by": by},
        "train": {"--data": data, "--out": tmp / "model", "--model": "tiny-random", "--scores": run / "scores.jsonl",
                  "--ratio": "0.3", "--by": by},
        "evaluate": {"--data": data, "--run-dir": run, "--ratio": "0.5", "--model": "tiny-random"},
    }[command]


FLAGS = [(command, flag) for command in ("score", "select", "train", "evaluate") for flag, action in _flags(command)
         if action.nargs not in ("+", "*")]


@fuzz(250)
@given(command_flag=st.sampled_from(FLAGS), value=bad_texts, by=st.sampled_from(["miwv", "random", "ifd", "length"]))
def test_fuzz_flag_values_drawn_from_the_schema(base_run, no_work, tmp_path_factory, command_flag, value, by):
    """Each flag of score/select/train/evaluate (most derive from a schema field; the rest are the parser's own)
    gets a hostile value: refused with one error line naming the flag before any model loads, or accepted."""
    command, flag = command_flag
    tmp = tmp_path_factory.mktemp("flags")
    os.chdir(tmp)  # relative paths among the values land here (no_work returns to the old directory)
    argv = _base_argv(command, base_run, tmp, by) | {flag: value}
    before = digest(base_run["root"])
    result = run_main([command, *[x for pair in argv.items() for x in pair]])
    name = flag.lstrip("-")
    # the flag, or the path given (as the one-line rule shows it: whitespace such as a "\r" becomes a space)
    named = (flag, name, name.replace("-", "_")) + ((value, " ".join(value.split())) if value.strip() else ())
    state = check_contract(result, names=named, allow_work=True, family="flag values")
    assert digest(base_run["root"]) == before, flag
    if state == "ok" and command == "select" and Path(argv["--out"]).suffix == ".json":
        strict_json(Path(argv["--out"]).read_text())


# --------------------------------------------------------------------------- (c) YAML configs, key by key

yaml_values = st.one_of(
    json_values, st.sampled_from([float("nan"), float("inf"), -1, 0, 10**30, "abc", [], {}, [None], {"a": None},
                                  "1e999", [0.5, "x"], {"x": -1}, True]), st.dates(), st.datetimes())


@pytest.fixture(scope="module")
def study_dict():
    return yaml.safe_load((REPO / "configs" / "study" / "smoke.yaml").read_text())


@pytest.fixture(scope="module")
def pipeline_dict():
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def _mutate(draw, config: dict) -> dict:
    config = json.loads(json.dumps(config))
    target = config
    key = draw(st.sampled_from(sorted(config) + ["unknown_key"]))
    if isinstance(config.get(key), dict) and config[key] and draw(st.booleans()):
        target, key = config[key], draw(st.sampled_from(sorted(config[key]) + ["Unknown"]))
    target[key] = draw(yaml_values)
    return config


@fuzz(40)
@given(data=st.data(), kind=st.sampled_from(["study", "pipeline"]))
def test_fuzz_yaml_configs_mutated_key_by_key(study_dict, pipeline_dict, tmp_path_factory, monkeypatch, data, kind):
    import miwv_lib.experiments.pipeline
    import miwv_lib.experiments.study

    def door(self, *args, **kwargs):
        raise _WorkStarted

    monkeypatch.setattr(miwv_lib.experiments.study.Study, "run", door)
    monkeypatch.setattr(miwv_lib.experiments.pipeline, "execute_notebook", lambda *a, **k: (_ for _ in ()).throw(_WorkStarted()))
    tmp = tmp_path_factory.mktemp("yaml")
    config = tmp / "config.yaml"
    if data.draw(st.integers(0, 7), label="binary") == 0:
        config.write_bytes(data.draw(st.binary(min_size=1, max_size=200), label="bytes"))
    else:
        mutated = _mutate(data.draw, study_dict if kind == "study" else pipeline_dict)
        config.write_bytes(yaml.safe_dump(mutated, allow_unicode=True).encode("utf-8", "surrogatepass"))
    before = digest(config)
    argv = [kind, "--config", config, "--run-dir", tmp / "run"] + (["--results-dir", tmp / "res"] if kind == "study"
                                                                   else ["--no-progress"])
    result = run_main(argv)
    check_contract(result, names=(str(config),), allow_work=True, family="YAML configs")
    assert digest(config) == before


# --------------------------------------------------------------------------- (d) faults in a finished run directory

RUN_FILES = ("scores.jsonl", "manifest.json", "neighbors.json")


@st.composite
def faults(draw):
    """One to three (file, kind, detail) faults."""
    return draw(st.lists(st.tuples(st.sampled_from(RUN_FILES),
                                   st.sampled_from(["truncate", "delete", "bytes", "edit", "empty", "binary"]),
                                   st.integers(0, 10**6), json_values), min_size=1, max_size=3))


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


def _inject(path: Path, kind: str, n: int, value) -> None:
    if not path.exists():
        return
    blob = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(blob[: n % max(len(blob), 1)])
    elif kind == "delete":
        path.unlink()
    elif kind == "bytes":
        at = n % max(len(blob), 1)
        path.write_bytes(blob[:at] + bytes([n % 256]) + blob[at + 1:])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 2)
    else:  # edit one value, as a person with an editor would
        try:
            lines = blob.decode("utf-8").splitlines() if path.suffix == ".jsonl" else [blob.decode("utf-8")]
            line = n % len(lines)
            obj = json.loads(lines[line])
        except (ValueError, ZeroDivisionError):
            return  # an earlier fault left nothing to edit
        leaf = list(_leaves(obj))[n % len(list(_leaves(obj)))]
        if not leaf:
            obj = value
        else:
            target = obj
            for p in leaf[:-1]:
                target = target[p]
            target[leaf[-1]] = value
        lines[line] = json.dumps(obj, indent=None if path.suffix == ".jsonl" else 2)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@fuzz(40)
@given(injected=faults(), command=st.sampled_from(["select", "score", "select"]))
def test_fuzz_faults_in_a_finished_run_directory(base_run, tmp_path_factory, injected, command):
    tmp = tmp_path_factory.mktemp("fault")
    run = shutil.copytree(base_run["run"], tmp / "run")
    for name, kind, n, value in injected:
        _inject(run / name, kind, n, value)
    scores_intact = (run / "scores.jsonl").exists() and \
        (run / "scores.jsonl").read_bytes() == (base_run["run"] / "scores.jsonl").read_bytes()
    before = digest(run, base_run["data"])
    if command == "select":
        (tmp / "subset.json").write_text("an earlier subset\n")
        before = digest(run, base_run["data"], tmp / "subset.json")
        result = run_main(["select", "--data", base_run["data"], "--scores", run / "scores.jsonl", "--ratio", "0.5",
                           "--out", tmp / "subset.json"])
    else:
        result = run_main(["score", "--data", base_run["data"], "--out", run, *FAST])
    state = check_contract(result, names=tuple(str(run / f) for f in RUN_FILES) + (str(run),), family="run directory")
    if state == "error":
        assert digest(run, base_run["data"], *([tmp / "subset.json"] if command == "select" else [])) == before
    elif command == "select":
        produced = (tmp / "subset.json").read_bytes()
        assert produced == base_run["reference"].read_bytes() or not scores_intact, "a wrong subset from intact scores"
        strict_json(produced.decode())
    else:  # a re-run that succeeds has the run's one correct result
        assert (run / "scores.jsonl").read_bytes() == (base_run["run"] / "scores.jsonl").read_bytes()
        assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


@contextlib.contextmanager
def read_only_copy(source: Path, tmp_path: Path):
    """A copy of ``source`` in a directory this process cannot write: ``chmod 555`` for a normal user; for
    root, whom permissions do not stop, a tmpfs remounted read-only (skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        run = shutil.copytree(source, tmp_path / "run")
        (run / "scores.jsonl").unlink()  # so that a re-run has to write
        os.chmod(run, 0o555)
        try:
            yield run
        finally:
            os.chmod(run, 0o755)
        return
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        pytest.skip("runs as root, and cannot mount a read-only tmpfs here: "
                    f"{done.stderr.strip() if done else 'no mount command'}")
    try:
        run = shutil.copytree(source, mount / "run")
        (run / "scores.jsonl").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield run
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_run_directory(base_run, tmp_path):
    with read_only_copy(base_run["run"], tmp_path) as run:
        assert not os.access(run, os.W_OK) or os.geteuid() == 0
        before = digest(run)
        result = run_main(["score", "--data", base_run["data"], "--out", run, *FAST])
        check_contract(result, names=(str(run),), family="run directory")
        assert result.rc == 2 and digest(run) == before
        assert "write somewhere writable" in result.error_lines[0]


def test_disk_full_names_the_file_in_process(base_run, tmp_path, monkeypatch):
    """ENOSPC from write or fsync (which name no file) in the atomic writers: the error names the file."""
    import miwv_lib.runtime.io

    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    for target in ("io", "runs"):
        run = tmp_path / f"run-{target}"
        monkeypatch.setattr(miwv_lib.runtime.io.os if target == "io" else sys.modules["miwv_lib.runtime.runs"].os, "fsync", full)
        result = run_main(["score", "--data", base_run["data"], "--out", run, *FAST])
        monkeypatch.setattr(os, "fsync", real_fsync)
        check_contract(result, names=(str(run),), family="disk full")
        assert result.rc == 2 and "No space left on device" in result.error_lines[0]
        assert "run the same command again" in result.error_lines[0]
        assert not (run / "scores.jsonl").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(done.stderr.strip() if done else 'no mount command')}); "
                    "test_disk_full_names_the_file_in_process simulates ENOSPC instead")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@fuzz(8)
@given(free=st.integers(0, 40_000))
def test_a_disk_that_fills_up(base_run, small_tmpfs, free):
    """A real full disk (a 256 KiB tmpfs with ``free`` bytes left): success with the right result, or one error
    line naming the file it could not write."""
    for old in small_tmpfs.iterdir():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            handle.write(b"\0" * (256 * 1024))
    size = filler.stat().st_size
    with open(filler, "r+b") as handle:
        handle.truncate(max(0, size - free))
    run = small_tmpfs / "run"
    result = run_main(["score", "--data", base_run["data"], "--out", run, *FAST])
    if check_contract(result, names=(str(run),), family="disk full") == "ok":
        assert (run / "scores.jsonl").read_bytes() == (base_run["run"] / "scores.jsonl").read_bytes()
    else:
        assert "No space left on device" in result.error_lines[0]
        # Never a complete-looking scores.jsonl from a failed run: the manifest is written before it counts, and a
        # failure there removes the merged file (the partial files stay, so a re-run merges them again).
        assert not (run / "scores.jsonl").exists()


# --------------------------------------------------------------------------- a handful end to end


def _pool_bytes(rows: list, **replace) -> bytes:
    text = json.dumps(rows)
    for placeholder, token in replace.items():
        text = text.replace(json.dumps(placeholder), token)
    return text.encode()


END_TO_END = [
    ("5000-digit-integer", "pool.json", _pool_bytes([*GOOD[:2], {**GOOD[2], "meta": "BIG"}], BIG="9" * 5000),
     ["score"], ["pool.json", "5000 digits"]),
    ("nan-in-an-extra-column", "pool.jsonl",
     b"".join(_pool_bytes([{**r, "meta": "X"}], X="NaN")[1:-1] + b"\n" for r in GOOD), ["score"],
     ["pool.jsonl, row 0", "field 'meta'", "NaN"]),
    ("capitalised-alpaca-keys", "pool.json",
     json.dumps([{"Instruction": r["instruction"], "Output": r["output"]} for r in GOOD]).encode(), ["score"],
     ["pool.json", "rename the field 'Instruction' to 'instruction'"]),
    ("binary-config", "config.yaml", bytes(range(256)), ["study", "--config", "{file}"], ["config.yaml"]),
    ("bad-flag", "pool.json", json.dumps(GOOD).encode(), ["score", "--batch-size", "nan"], ["--batch-size"]),
]


@pytest.mark.parametrize("name, file, blob, argv, fragments", END_TO_END, ids=[c[0] for c in END_TO_END])
def test_end_to_end_in_a_real_process(tmp_path, name, file, blob, argv, fragments):
    path = tmp_path / file
    path.write_bytes(blob)
    before = digest(tmp_path)
    argv = [a.replace("{file}", str(path)) for a in argv]
    if argv[0] == "score":
        argv += ["--data", str(path), "--out", str(tmp_path / "run"), *FAST]
    env = {k: v for k, v in os.environ.items() if k not in ("MIWV_DATA_DIR", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "miwv_lib", *argv], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    outcome = Outcome(done.returncode, done.stdout, done.stderr)
    check_contract(outcome, family="end to end (subprocess)")
    assert outcome.rc == 2, outcome.err[-2000:]
    for fragment in fragments:
        assert fragment in outcome.error_lines[0], (fragment, outcome.error_lines[0])
    assert digest(tmp_path) == before and not (tmp_path / "run" / "scores.jsonl").exists()


# --------------------------------------------------------------------------- signals at random moments


def _score_process(data: Path, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MIWV_DATA_DIR", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    argv = ["score", "--data", data, "--out", out, "--chunk-rows", "2", *FAST]
    return subprocess.Popen([sys.executable, "-m", "miwv_lib", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration  # two real score processes per case: CI runs it, the contributors' fast lane does not
@fuzz(2)
@given(delay=st.floats(0.2, 12.0), signum=st.sampled_from([signal.SIGINT, signal.SIGTERM]))
def test_fuzz_a_signal_at_a_random_moment_of_a_score_run(base_run, tmp_path_factory, delay, signum):
    """Ctrl-C or a kill at any moment (importing, loading the model, embedding, scoring, writing): no traceback,
    never a complete-looking wrong scores.jsonl, and the same command then finishes with the same numbers."""
    out = tmp_path_factory.mktemp("signal") / "run"
    before = digest(base_run["data"])
    process = _score_process(base_run["data"], out)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    FUZZ_CASES["signals at random moments (subprocess)"] += 1
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode in (0, 130, -signal.SIGTERM), (process.returncode, err[-2000:])
    if process.returncode == 130:
        assert err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    if process.returncode == 0:
        assert (out / "scores.jsonl").exists()
    resumed = _score_process(base_run["data"], out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    expected = [json.loads(line) for line in (base_run["run"] / "scores.jsonl").read_text("utf-8").splitlines()]
    got = [json.loads(line) for line in (out / "scores.jsonl").read_text("utf-8").splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for a, b in zip(got, expected):
        assert a["status"] == b["status"] and abs(a["miwv"] - b["miwv"]) < 1e-5, (a, b)
    assert digest(base_run["data"]) == before
