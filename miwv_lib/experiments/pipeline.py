"""Run the notebooks in order with papermill, then write ``run_dir/report.md`` (``miwv pipeline --config ...``).

A configuration (YAML or a dict) has shared ``parameters`` (a notebook gets those its ``parameters`` cell declares),
per-notebook ones under ``notebooks``, a ``run_dir`` and a ``description``; its relative paths are from the repository.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from unittest import mock

from ..runtime.io import atomic_open, write_json
from ..runtime.runs import now, read_yaml_mapping
from ..runtime.schema import each, field_problem, integer

CONFIG_KEYS = ("description", "run_dir", "parameters", "notebooks")


class PipelineError(RuntimeError):
    """A configuration problem, or a notebook that failed (``notebook``, ``cell_index``, ``executed_path``)."""

    def __init__(self, message: str, *, notebook: str | None = None, cell_index: int | None = None,
                 executed_path: Path | None = None) -> None:
        super().__init__(message)
        self.notebook, self.cell_index, self.executed_path = notebook, cell_index, executed_path


def repo_root() -> Path:
    """The checkout that holds ``miwv_lib/`` (and ``notebooks/``, ``configs/``, ``data/``)."""
    return Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """An absolute path as it is (``~`` expanded); a relative one against the repository root."""
    return repo_root() / os.path.expanduser(path)  # joining an absolute path gives that path


def user_path(path: str | Path) -> Path:
    """A file as the user named it (a config, a data file): from the current directory, else from the repository
    (so ``configs/demo.yaml`` and ``data/examples/smoke_pool.json`` work from anywhere)."""
    path = Path(os.path.expanduser(path))
    return repo_root() / path if not path.exists() and (repo_root() / path).exists() else path  # absolute: as named


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """The run directory as an absolute path (default ``runs/notebooks`` in the repository), created."""
    path = resolve_path(run_dir or "runs/notebooks")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data_source(data: str | Path | None) -> str | None:
    """What to hand to ``load_instructions``: a registry name or hub id as it is; a file as ``user_path`` finds it."""
    if not data:
        return None
    from ..data.datasets import REGISTRY

    if str(data) in REGISTRY:
        return str(data)
    path = user_path(data)
    if path.is_absolute():  # as named, or as found in the repository; a missing one is still a file, not a hub id
        return str(path)
    return str(path.resolve()) if path.exists() else str(data)  # else a hub id, or a missing file: the loader tells


def notebook_paths() -> list[Path]:
    return sorted(p for p in (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb") if p.is_file())


def describe_notebooks() -> list[dict]:
    """One row per numbered notebook: its file, its title (first Markdown heading) and its parameters."""
    import nbformat
    import papermill

    out = []
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        title = next((line.lstrip("#").strip() for cell in nb.cells if cell.cell_type == "markdown"
                      for line in cell.source.splitlines() if line.startswith("#")), path.stem)
        parameters = ", ".join(f"{k}: {v['inferred_type_name']} = {v['default']}"
                               for k, v in papermill.inspect_notebook(str(path)).items())
        out.append({"notebook": path.name, "title": title, "parameters": parameters})
    return out


def load_config(config: str | Path | Mapping | None) -> dict:
    """A validated configuration dict (``parameters`` and ``notebooks`` always present)."""
    raw, origin, config_path = {}, "<empty configuration>", None
    if isinstance(config, Mapping):
        raw, origin = dict(config), "<dict>"
    elif config is not None:
        path = user_path(config)
        raw, origin, config_path = read_yaml_mapping(path, config, PipelineError), str(config), str(path.resolve())
    if unknown := sorted(set(raw) - set(CONFIG_KEYS)):
        raise PipelineError(f"{origin}: unknown keys {unknown}; allowed: {', '.join(CONFIG_KEYS)}")
    parameters, notebooks = raw.get("parameters") or {}, raw.get("notebooks") or {}
    if not isinstance(parameters, Mapping):
        raise PipelineError(f"{origin}: 'parameters' must be a mapping of name: value")
    if not isinstance(notebooks, Mapping) or not all(isinstance(v or {}, Mapping) for v in notebooks.values()):
        raise PipelineError(f"{origin}: 'notebooks' must map a notebook name to a mapping of name: value")
    return {"description": raw.get("description"), "run_dir": raw.get("run_dir"), "parameters": dict(parameters),
            "notebooks": {_stem(k): dict(v or {}) for k, v in notebooks.items()}, "source": origin,
            "path": config_path}  # the file it came from (given to notebooks that declare `config`)


def parse_overrides(items: Iterable[str] | Mapping | None) -> dict[str, Any]:
    """``["limit=50", "03_selection.ratios=[0.1]"]`` -> ``{"limit": 50, "03_selection.ratios": [0.1]}``: values
    are read as YAML (numbers, lists, ``null``, ``true``); anything else stays a string."""
    import yaml

    if items is None or isinstance(items, Mapping):
        return dict(items or {})
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _stem(name: str | Path) -> str:
    return Path(str(name)).name.removesuffix(".ipynb")


def plan_parameters(config: Mapping, notebooks: Sequence[Path], run_dir: Path) -> dict[str, dict]:
    """The parameters each of ``notebooks`` will get: the shared ones it declares, its own, and ``run_dir``. A
    parameter that no notebook (or not its notebook) declares is an error: it is almost always a typo."""
    import papermill

    declared = {path.stem: papermill.inspect_notebook(str(path)) for path in {*notebook_paths(), *notebooks}}
    all_names = {name for names in declared.values() for name in names}
    where = f"{config.get('source') or 'the configuration'}: "  # the file the typo is in
    if unused := sorted(set(config["parameters"]) - all_names):
        raise PipelineError(f"{where}no notebook declares the parameter(s) {unused} (a typo?); "
                            f"declared: {sorted(all_names)}")
    if unknown := sorted(set(config["notebooks"]) - set(declared)):
        raise PipelineError(f"{where}the configuration names unknown notebooks {unknown}; known: {sorted(declared)}")
    for stem, own in config["notebooks"].items():  # also those not run this time: a typo is one all the same
        if undeclared := sorted(set(own) - set(declared[stem])):
            raise PipelineError(f"{where}notebook {stem} declares no parameter {undeclared}; "
                                f"it declares {sorted(declared[stem])}", notebook=stem)
    plan: dict[str, dict] = {}
    for path in notebooks:
        stem, names = path.stem, declared[path.stem]
        own = config["notebooks"].get(stem, {})
        params = {k: v for k, v in config["parameters"].items() if k in names} | own
        for name, value in params.items():
            if problem := parameter_problem(stem, name, value, names[name]["inferred_type_name"]):
                raise PipelineError(f"{where}{name} (a parameter of {stem}): {problem}", notebook=stem)
        if "config" in names and "config" not in params and config.get("path"):
            params["config"] = config["path"]
        if "run_dir" in names:
            params["run_dir"] = str(run_dir)
        plan[stem] = params
    return plan


def _type_problem(annotation: str, value: Any) -> str | None:
    """What is wrong with ``value`` for a parameters cell's annotation (``int``, ``Optional[str]``, ``list[float]``)."""
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional["):-1] if optional else annotation
    if value is None:
        return None if optional else f"expected {kind}, got null"
    if kind.startswith("list[") and isinstance(value, list):
        return next((f"item {i}: {p}" for i, v in enumerate(value) if (p := _type_problem(kind[5:-1], v))), None)
    fits = {"str": str, "int": int, "float": (int, float), "bool": bool, "list[": list}
    wanted = next((t for k, t in fits.items() if kind.startswith(k)), None)
    if wanted is None or (isinstance(value, wanted) and (kind == "bool" or not isinstance(value, bool))):
        return None
    return f"expected {kind}, got {value!r}"


def parameter_problem(notebook: str, name: str, value: Any, annotation: str) -> str | None:
    """A notebook parameter checked by its annotation in the parameters cell and by the rule of the configuration
    field of that name (the notebook builds that configuration from it): before any notebook runs."""
    from .generate import GenerateConfig
    from .judges import judge_rule
    from .score import ScoreConfig
    from .select import method_rule, ratio_rule
    from .train import TrainConfig

    schema = {"02_miwv_scoring": ScoreConfig, "04_finetune": TrainConfig, "05_evaluate": GenerateConfig}
    fields_ = {f.name: f for f in fields(schema[notebook])} if notebook in schema else {}
    rules = {"ratios": each(ratio_rule), "train_ratio": ratio_rule, "judges": each(judge_rule),
             "methods": each(method_rule), "train_methods": each(method_rule), "limit": integer(1, optional=True),
             "sample": integer(2, optional=True), "prompts_per_set": integer(1, optional=True)}
    # both: the cell's type is what the notebook's own code assumes (02 does arithmetic with max_length)
    rule = (lambda v: field_problem(fields_[name], v)) if name in fields_ else rules.get(name, lambda v: None)
    return _type_problem(annotation, value) or rule(value)


@dataclass
class PipelineResult:
    run_dir: Path
    executed: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def _select_notebooks(notebooks: Sequence[str | Path] | None) -> list[Path]:
    available = notebook_paths()
    if not available:
        raise PipelineError(f"no notebooks found in {repo_root() / 'notebooks'}")
    chosen = set()
    for item in notebooks or []:
        matches = [p for p in available if _stem(item) in (p.stem, p.stem.split("_", 1)[0])]
        if len(matches) != 1:
            raise PipelineError(f"unknown notebook {item!r}; available: {', '.join(p.stem for p in available)}")
        chosen.add(matches[0])
    return sorted(chosen) if notebooks else available


def run_pipeline(config: str | Path | Mapping | None, run_dir: str | Path | None = None,
                 notebooks: Sequence[str | Path] | None = None, overrides: Iterable[str] | Mapping | None = None,
                 *, progress: bool = True, report: bool = True) -> PipelineResult:
    """Execute the notebooks (all, or those named: ``"02_miwv_scoring"``, ``"02"``) into ``run_dir/notebooks/`` and
    write ``run_dir/report.md``; a failure is a :class:`PipelineError` naming the notebook and cell. ``run_dir``:
    argument > ``--set run_dir=`` > the configuration's > ``runs/notebooks``; ``NN_name.key`` overrides one notebook's.
    """
    from tqdm.auto import tqdm

    cfg = load_config(config)
    paths = _select_notebooks(notebooks)
    stems = [p.stem for p in notebook_paths()]
    for key, value in parse_overrides(overrides).items():  # into cfg: load_config made it, nothing else holds it
        prefix, dot, name = key.partition(".")
        if dot and prefix in stems:
            cfg["notebooks"].setdefault(prefix, {})[name] = value
        elif key == "run_dir":
            cfg["run_dir"] = value
        else:
            cfg["parameters"][key] = value
    if not isinstance(chosen := run_dir if run_dir is not None else cfg["run_dir"], (str, Path, type(None))):
        raise PipelineError(f"{cfg['source']}: run_dir: expected a path, got {chosen!r}")
    out_dir = resolve_run_dir(chosen)
    plan = plan_parameters(cfg, paths, out_dir)

    result, error = PipelineResult(run_dir=out_dir), None
    record = {"config": cfg["source"], "description": cfg["description"], "started": now(),
              "status": "running", "parameters": plan, "seconds": result.seconds}
    write_json(out_dir / "pipeline.json", record)
    with tqdm(paths, desc="notebooks", unit="nb", disable=not progress) as bar:
        for path in bar:
            bar.set_postfix_str(path.stem)
            t0 = time.perf_counter()
            final, error = execute_notebook(path, plan[path.stem], out_dir / "notebooks", progress=progress)
            result.seconds[path.stem] = round(time.perf_counter() - t0, 1)
            if error is not None:
                break
            result.executed.append(final)
    failure = {"failed": path.stem, "error": str(error)} if error is not None else {}
    record.update(status="failed" if failure else "complete", finished=now(), **failure)
    write_json(out_dir / "pipeline.json", record)
    if error is not None:
        raise error
    if report:
        from .report import write_report

        result.report = write_report(out_dir)
    return result


def publish_run(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy a run's executed notebooks, ``report.md`` and figures into ``dest`` (e.g. ``results/demo``). This
    machine's paths (the run, the repository, the data mirror, home) become names a reader knows."""
    run_dir, dest = Path(run_dir).resolve(), Path(os.path.expanduser(dest)).resolve()
    shown = str(run_dir.relative_to(repo_root())) if run_dir.is_relative_to(repo_root()) else run_dir.name
    names = {str(run_dir): shown, str(repo_root()): ".", str(Path.home()): "~"}
    if data_dir := os.environ.get("MIWV_DATA_DIR"):
        names[str(Path(data_dir).resolve())] = names[data_dir.rstrip("/")] = "$MIWV_DATA_DIR"
    order = sorted(names, key=len, reverse=True)  # the longest first: a run directory inside the repository
    written = []
    for source in [*sorted(run_dir.glob("notebooks/*.ipynb")), run_dir / "report.md",
                   *sorted(run_dir.glob("figures/*.png"))]:
        target = dest / source.relative_to(run_dir)
        if source.suffix == ".png":
            data = source.read_bytes()
        else:
            text = source.read_text(encoding="utf-8")
            for name in order:
                text = text.replace(json.dumps(name)[1:-1] if source.suffix == ".ipynb" else name, names[name])
            data = text.encode("utf-8")
        with atomic_open(target, "wb") as handle:
            handle.write(data)
        written.append(target)
    return written


def execute_notebook(path: Path, parameters: dict, executed_dir: Path, *, progress: bool = False,
                     cell_timeout: int | None = None) -> tuple[Path, PipelineError | None]:
    """Run one notebook into ``executed_dir``; the executed copy is kept (renamed into place) even when it fails."""
    import papermill
    from traitlets.config import Config

    executed_dir.mkdir(parents=True, exist_ok=True)
    final = executed_dir / path.name
    partial = executed_dir / f".{path.stem}.partial.ipynb"  # renamed over `final` when done
    try:
        with (tempfile.TemporaryDirectory(prefix="miwv-kernel-") as sockets,
              _cell_progress(sockets) if progress else nullcontext()):
            # Unix sockets in a private directory: no TCP port, so no start-up warning about plain-text traffic
            # (Windows has no such sockets: TCP there).
            ipc = {"transport": "ipc", "ip": os.path.join(sockets, "kernel")}
            papermill.execute_notebook(
                str(path), str(partial), parameters=parameters,
                kernel_name="python3",  # the venv's own ipykernel: jupyter_client runs it with this interpreter
                progress_bar={"desc": path.stem, "leave": False} if progress else False,
                cwd=str(path.parent), start_timeout=120, execution_timeout=cell_timeout,
                **({} if os.name == "nt" else {"config": Config(KernelManager=ipc)}))
    except Exception as exc:  # a failing cell (PapermillExecutionError), a dead kernel, a timeout…
        return final, _notebook_failure(path.stem, exc, final if partial.exists() or final.exists() else None)
    finally:
        if partial.exists():
            settle_progress_bars(partial)
            os.replace(partial, final)
    return final, None


def _notebook_failure(stem: str, exc: Exception, saved: Path | None) -> PipelineError:
    if (cell := getattr(exc, "cell_index", None)) is None:  # not a failing cell: a dead kernel, a timeout…
        what = f"failed before finishing: {type(exc).__name__}: {exc}"
    else:
        first = next((line.strip() for line in (exc.source or "").splitlines() if line.strip()), "")
        what = (f"failed in cell {cell} (execution count {exc.exec_count}"
                f"{', which starts: ' + first[:80] if first else ''}): {exc.ename}: {exc.evalue}")
    where = f"; the executed notebook is saved at {saved}" if saved else ""
    error = PipelineError(f"notebook {stem} {what}{where}", notebook=stem, cell_index=cell, executed_path=saved)
    if cell is None:
        error.__cause__ = exc
    return error


# An IPython start-up file for the kernel: every tqdm bar a cell draws (scoring, training, generation) also writes
# its state to a file, which the pipeline shows in the terminal, so a long cell shows the work inside it.
_CELL_PROGRESS_STARTUP = """\
import contextlib, json, os, time
import tqdm.std


def _miwv_reporting(method, path=os.environ["MIWV_CELL_PROGRESS"], last=[0.0]):
    def reporting(self, *args, **kwargs):
        done = method(self, *args, **kwargs)
        # A disabled bar has no state to show; the terminal's copy of a bar must never break the cell that draws it.
        if not getattr(self, "disable", True) and (method.__name__ == "close" or time.monotonic() - last[0] >= 0.25):
            last[0] = time.monotonic()
            with contextlib.suppress(Exception):
                with open(path + ".tmp", "w") as f:
                    json.dump({"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit}, f)
                os.replace(path + ".tmp", path)
        return done
    return reporting


tqdm.std.tqdm.update = _miwv_reporting(tqdm.std.tqdm.update)
tqdm.std.tqdm.close = _miwv_reporting(tqdm.std.tqdm.close)
"""


@contextmanager
def _cell_progress(directory: str) -> Iterator[None]:
    """Show, under the notebook's bar, the progress bar the running cell draws inside the kernel."""
    from tqdm.auto import tqdm

    startup = Path(directory, "ipython", "profile_default", "startup")
    startup.mkdir(parents=True)
    (startup / "00-miwv-cell-progress.py").write_text(_CELL_PROGRESS_STARTUP, encoding="utf-8")
    state, stop, seen = Path(directory, "cell-progress.json"), threading.Event(), {}
    bar = tqdm(total=None, desc="  cell", leave=False)

    def show() -> None:
        try:
            info = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # not started yet, or replaced while being read
        if info == seen:
            return
        if (info["desc"], info["total"]) != (seen.get("desc"), seen.get("total")):  # another bar
            bar.reset(total=info["total"])
            bar.unit = info["unit"]
            bar.set_description_str(f"  {info['desc'] or 'cell'}", refresh=False)
        seen.update(info)
        bar.n = info["n"]
        bar.refresh()

    def follow() -> None:
        while not stop.wait(0.5):
            show()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:  # the kernel inherits these two; patch.dict puts this process's environment back afterwards
        with mock.patch.dict(os.environ, IPYTHONDIR=str(startup.parents[1]), MIWV_CELL_PROGRESS=str(state)):
            yield
    finally:
        stop.set()
        thread.join()
        show()  # the state the last bar ended in
        bar.close()


def _settle(output: dict, state: Mapping[str, dict]) -> bool:
    """Give a tqdm notebook bar (HBox of HTML, FloatProgress, HTML) its final text; False: a bar tqdm hid, to drop."""
    view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
    model = state.get(view["model_id"]) if view else None
    if not model or model.get("model_name") != "HBoxModel":
        return True
    children = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in model["state"].get("children", [])]
    if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return True  # another widget
    left, bar, right = (c["state"] for c in children)
    layout = state.get(model["state"].get("layout", "").removeprefix("IPY_MODEL_"), {}).get("state", {})
    if layout.get("visibility") == "hidden":
        return False
    total = bar.get("max") or 0.0
    filled = int(10 * (bar.get("value") or 0.0) / total) if total else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    output["data"]["text/plain"] = html.unescape(text).replace("\u2007", " ")
    return True


def settle_progress_bars(path: str | Path) -> None:
    """Make an executed notebook's tqdm bars read as they ended outside Jupyter (GitHub, nbviewer, nbconvert):
    their plain-text fallback ("0%") gets the final text from the saved widget state; bars tqdm hid are dropped."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    widgets = nb.metadata.get("widgets", {})
    if not (state := widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})):
        return
    for cell in nb.cells:
        if "outputs" in cell:
            cell["outputs"] = [output for output in cell["outputs"] if _settle(output, state)]
    with atomic_open(path) as handle:
        nbformat.write(nb, handle)
