"""Run the notebooks in order with papermill: ``python -m miwv_lib pipeline --config configs/demo.yaml``.

A configuration is a YAML file (or a dict) with

* ``parameters``: shared values, given to every notebook that declares a parameter of that name;
* ``notebooks`` (optional): per-notebook values, ``{"03_selection": {"ratios": [0.05]}}``;
* ``run_dir`` (optional): where everything goes; ``description`` (optional): free text.

Each notebook's parameters are read from its cell tagged ``parameters`` (``papermill.inspect_notebook``),
so a notebook only receives what it declares. Executed copies go to ``run_dir/notebooks/``, and at the
end ``run_dir/report.md`` is written from the files in ``run_dir`` (see :mod:`miwv_lib.experiments.report`).

Paths: a relative path in a configuration or in a notebook parameter is relative to the repository root
(:func:`repo_root`), never to the current directory, so notebooks run the same from anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from ..runtime.io import atomic_open, write_json
from ..runtime.runs import now, read_yaml_mapping

CONFIG_KEYS = ("description", "run_dir", "parameters", "notebooks")
DEFAULT_RUN_DIR = "runs/notebooks"
KERNEL_NAME = "python3"  # the venv's own ipykernel; jupyter_client runs it with the current interpreter


class PipelineError(RuntimeError):
    """A configuration problem, or a notebook that failed (``notebook``, ``cell_index``, ``executed_path``)."""

    def __init__(self, message: str, *, notebook: str | None = None, cell_index: int | None = None,
                 exec_count: int | None = None, executed_path: Path | None = None) -> None:
        super().__init__(message)
        self.notebook = notebook
        self.cell_index = cell_index
        self.exec_count = exec_count
        self.executed_path = executed_path


def repo_root() -> Path:
    """The checkout that holds ``miwv_lib/`` (and ``notebooks/``, ``configs/``, ``data/``)."""
    return Path(__file__).resolve().parents[2]


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def resolve_path(path: str | Path) -> Path:
    """An absolute path as it is (``~`` expanded); a relative one against the repository root."""
    path = Path(os.path.expanduser(path))
    return path if path.is_absolute() else repo_root() / path


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """The run directory as an absolute path (default ``runs/notebooks`` in the repository), created."""
    path = resolve_path(run_dir if run_dir not in (None, "") else DEFAULT_RUN_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data_source(data: str | Path | None) -> str | None:
    """What to hand to :func:`miwv_lib.load_instructions`.

    A registry name or a hub id is passed through. A relative file path is looked up in the repository
    first, then in the current directory; an absolute path is kept.
    """
    if data is None or str(data) == "":
        return None
    from ..data.datasets import REGISTRY

    text = str(data)
    if text in REGISTRY:
        return text
    path = Path(os.path.expanduser(text))
    if path.is_absolute():
        return str(path)
    if (repo_root() / path).exists():
        return str(repo_root() / path)
    if path.exists():
        return str(path.resolve())
    return text  # a hub id, or a missing file: load_instructions says which


def notebook_paths(directory: str | Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb``, in order."""
    directory = Path(directory) if directory is not None else notebooks_dir()
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def notebook_parameters(path: str | Path) -> dict[str, dict]:
    """``{name: {inferred_type_name, default, help}}`` from the notebook's ``parameters`` cell."""
    import papermill

    return {name: {k: v for k, v in info.items() if k != "name"}
            for name, info in papermill.inspect_notebook(str(path)).items()}


def describe_notebooks(directory: str | Path | None = None) -> list[dict]:
    """One row per numbered notebook: its file, its title (first Markdown heading) and its parameters."""
    import nbformat

    out = []
    for path in notebook_paths(directory):
        nb = nbformat.read(path, as_version=4)
        title = next((line.lstrip("#").strip() for cell in nb.cells if cell.cell_type == "markdown"
                      for line in cell.source.splitlines() if line.startswith("#")), path.stem)
        params = notebook_parameters(path)
        out.append({"notebook": path.name, "title": title,
                    "parameters": ", ".join(f"{k}: {v['inferred_type_name']} = {v['default']}"
                                            for k, v in params.items())})
    return out


def load_config(config: str | Path | Mapping | None) -> dict:
    """A validated configuration dict (``parameters`` and ``notebooks`` always present)."""
    config_path = None
    if config is None:
        raw: Any = {}
        origin = "<empty configuration>"
    elif isinstance(config, Mapping):
        raw, origin = dict(config), "<dict>"
    else:
        path = Path(os.path.expanduser(config))
        if not path.is_file() and not path.is_absolute() and (repo_root() / path).is_file():
            path = repo_root() / path
        raw = read_yaml_mapping(path, config, PipelineError)
        origin = str(config)
        config_path = str(path.resolve())
    if not isinstance(raw, Mapping):
        raise PipelineError(f"{origin}: expected a mapping with keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise PipelineError(f"{origin}: unknown keys {unknown}; allowed: {', '.join(CONFIG_KEYS)}")
    parameters = raw.get("parameters") or {}
    notebooks = raw.get("notebooks") or {}
    if not isinstance(parameters, Mapping):
        raise PipelineError(f"{origin}: 'parameters' must be a mapping of name: value")
    if not isinstance(notebooks, Mapping) or not all(isinstance(v or {}, Mapping) for v in notebooks.values()):
        raise PipelineError(f"{origin}: 'notebooks' must map a notebook name to a mapping of name: value")
    return {
        "description": raw.get("description"),
        "run_dir": raw.get("run_dir"),
        "parameters": dict(parameters),
        "notebooks": {_stem(k): dict(v or {}) for k, v in notebooks.items()},
        "source": origin,
        "path": config_path,  # the file it came from (given to notebooks that declare `config`)
    }


def parse_overrides(items: Iterable[str] | Mapping | None) -> dict[str, Any]:
    """``["limit=50", "03_selection.ratios=[0.1, 0.2]"]`` -> ``{"limit": 50, "03_selection.ratios": [0.1, 0.2]}``.

    Values are read as YAML (numbers, lists, ``null``, ``true``); anything else stays a string.
    """
    import yaml

    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"override {item!r} is not of the form key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed
    return out


def _stem(name: str | Path) -> str:
    return Path(str(name)).name.removesuffix(".ipynb")


def _apply_overrides(config: dict, overrides: Mapping[str, Any], stems: Sequence[str]) -> dict:
    config = {**config, "parameters": dict(config["parameters"]),
              "notebooks": {k: dict(v) for k, v in config["notebooks"].items()}}
    for key, value in overrides.items():
        prefix, dot, name = key.partition(".")
        if dot and prefix in stems:
            config["notebooks"].setdefault(prefix, {})[name] = value
        elif key == "run_dir":
            config["run_dir"] = value
        else:
            config["parameters"][key] = value
    return config


def plan_parameters(config: Mapping, notebooks: Sequence[Path], run_dir: Path,
                    all_notebooks: Sequence[Path] | None = None) -> dict[str, dict]:
    """The parameters each of ``notebooks`` will get: the shared ones it declares, its own, and ``run_dir``.

    A shared parameter that no notebook (of ``all_notebooks``, default all numbered notebooks) declares,
    or a per-notebook one that its notebook does not declare, is an error: it is almost always a typo.
    """
    all_notebooks = list(all_notebooks) if all_notebooks is not None else notebook_paths()
    declared = {path.stem: notebook_parameters(path) for path in {*all_notebooks, *notebooks}}
    where = f"{config.get('source') or 'the configuration'}: "  # the file the typo is in
    unused = sorted(set(config["parameters"]) - {name for names in declared.values() for name in names})
    if unused:
        raise PipelineError(f"{where}no notebook declares the parameter(s) {unused} (a typo?); "
                            f"declared: {sorted({n for names in declared.values() for n in names})}")
    unknown = sorted(set(config["notebooks"]) - set(declared))
    if unknown:
        raise PipelineError(f"{where}the configuration names unknown notebooks {unknown}; known: {sorted(declared)}")
    plan: dict[str, dict] = {}
    for path in notebooks:
        stem, names = path.stem, declared[path.stem]
        params = {k: v for k, v in config["parameters"].items() if k in names}
        own = config["notebooks"].get(stem, {})
        undeclared = sorted(set(own) - set(names))
        if undeclared:
            raise PipelineError(f"{where}notebook {stem} declares no parameter {undeclared}; "
                                f"it declares {sorted(names)}",
                                notebook=stem)
        params.update(own)
        if "config" in names and "config" not in params and config.get("path"):
            params["config"] = config["path"]
        if "run_dir" in names:
            params["run_dir"] = str(run_dir)
        plan[stem] = params
    return plan


@dataclass
class PipelineResult:
    run_dir: Path
    executed: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def _select_notebooks(notebooks: Sequence[str | Path] | None) -> list[Path]:
    available = notebook_paths()
    if not available:
        raise PipelineError(f"no notebooks found in {notebooks_dir()}")
    if not notebooks:
        return available
    by_stem = {p.stem: p for p in available}
    chosen = []
    for item in notebooks:
        stem = _stem(item)
        matches = [p for s, p in by_stem.items() if s == stem or s.split("_", 1)[0] == stem]
        if len(matches) != 1:
            raise PipelineError(f"unknown notebook {item!r}; available: {', '.join(by_stem)}")
        chosen.append(matches[0])
    return sorted(set(chosen))


def run_pipeline(config: str | Path | Mapping | None, run_dir: str | Path | None = None,
                 notebooks: Sequence[str | Path] | None = None, overrides: Iterable[str] | Mapping | None = None,
                 *, progress: bool = True, report: bool = True, kernel_name: str = KERNEL_NAME,
                 start_timeout: int = 120, cell_timeout: int | None = None) -> PipelineResult:
    """Execute the notebooks in order into ``run_dir/notebooks/`` and write ``run_dir/report.md``.

    ``run_dir``: argument > ``--set run_dir=`` > the configuration's ``run_dir`` > ``runs/notebooks``.
    ``notebooks``: names (``"02_miwv_scoring"``, ``"02"``) to run instead of all of them.
    ``overrides``: ``key=value`` strings or a dict; ``NN_name.key`` targets one notebook.
    Raises :class:`PipelineError` naming the notebook and cell when one fails.
    """
    from tqdm.auto import tqdm

    cfg = load_config(config)
    paths = _select_notebooks(notebooks)
    cfg = _apply_overrides(cfg, parse_overrides(overrides), [p.stem for p in notebook_paths()])
    out_dir = resolve_run_dir(run_dir if run_dir is not None else cfg["run_dir"])
    plan = plan_parameters(cfg, paths, out_dir)
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)

    result = PipelineResult(run_dir=out_dir)
    record = {"config": cfg["source"], "description": cfg["description"], "started": now(),
              "status": "running", "parameters": plan, "seconds": result.seconds}
    write_json(out_dir / "pipeline.json", record)
    bar = tqdm(paths, desc="notebooks", unit="nb", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.stem)
        t0 = time.perf_counter()
        final, error = execute_notebook(path, plan[path.stem], out_dir / "notebooks", progress=progress,
                                kernel_name=kernel_name, start_timeout=start_timeout, cell_timeout=cell_timeout)
        result.seconds[path.stem] = round(time.perf_counter() - t0, 1)
        if error is not None:
            bar.close()
            record.update(status="failed", finished=now(), failed=path.stem, error=str(error))
            write_json(out_dir / "pipeline.json", record)
            raise error
        result.executed.append(final)
    bar.close()
    record.update(status="complete", finished=now())
    write_json(out_dir / "pipeline.json", record)
    if report:
        from .report import write_report

        result.report = write_report(out_dir)
    return result


def publish_run(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy a run's executed notebooks, ``report.md`` and figures into ``dest`` (e.g. ``results/demo``), to be
    read on the repository's web page. This machine's absolute paths (the run, the repository, the data
    mirror, the home directory) become the names a reader knows, so nothing machine-specific is committed."""
    run_dir, dest = Path(run_dir).resolve(), Path(os.path.expanduser(dest)).resolve()
    names = {str(run_dir): _shown(run_dir), str(repo_root()): ".", str(Path.home()): "~"}
    if os.environ.get("MIWV_DATA_DIR"):
        names[str(Path(os.environ["MIWV_DATA_DIR"]).resolve())] = "$MIWV_DATA_DIR"
        names[os.environ["MIWV_DATA_DIR"].rstrip("/")] = "$MIWV_DATA_DIR"
    order = sorted(names, key=len, reverse=True)  # the longest first: a run directory inside the repository
    written = []
    for source in sorted(run_dir.glob("notebooks/*.ipynb")) + [run_dir / "report.md"] + sorted(
            run_dir.glob("figures/*.png")):
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


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return path.name


def _local_kernel(sockets: str) -> dict:
    """The kernel talks over Unix sockets in a private directory: no TCP port is opened, so the kernel has
    no plain-text network traffic to warn about at start-up. (Windows has no such sockets: TCP there.)"""
    if os.name == "nt":
        return {}
    from jupyter_client.manager import KernelManager
    from traitlets import default

    class LocalKernelManager(KernelManager):
        @default("transport")
        def _transport(self):
            return "ipc"

        @default("ip")
        def _ip(self):
            return os.path.join(sockets, "kernel")

    return {"kernel_manager_class": LocalKernelManager}


def execute_notebook(path: Path, parameters: dict, executed_dir: Path, *, progress: bool = False,
                     kernel_name: str = KERNEL_NAME, start_timeout: int = 120,
                     cell_timeout: int | None = None) -> tuple[Path, PipelineError | None]:
    """Run one notebook into ``executed_dir``; the executed copy is kept (renamed into place) even when it fails."""
    import papermill

    executed_dir.mkdir(parents=True, exist_ok=True)
    final = executed_dir / path.name
    partial = executed_dir / f".{path.stem}.partial.ipynb"  # renamed over `final` when done
    error = None
    try:
        with tempfile.TemporaryDirectory(prefix="miwv-kernel-") as sockets, _cell_progress(sockets, progress):
            papermill.execute_notebook(
                str(path), str(partial), parameters=parameters, kernel_name=kernel_name,
                progress_bar={"desc": path.stem, "leave": False} if progress else False,
                cwd=str(path.parent), start_timeout=start_timeout, execution_timeout=cell_timeout,
                **_local_kernel(sockets),
            )
    except Exception as exc:  # a failing cell (PapermillExecutionError), a dead kernel, a timeout…
        error = _notebook_failure(path.stem, exc, partial, final)
    finally:
        if partial.exists():
            settle_progress_bars(partial)
            os.replace(partial, final)
    return final, error


# Run at the kernel's start (an IPython start-up file): every tqdm bar a cell draws (scoring, training,
# generation) also writes its state to a file, which the pipeline shows in the terminal. Without it a
# notebook sits at "10/22 cells" for minutes with no sign of the work inside the cell.
_CELL_PROGRESS_STARTUP = """\
import json, os, time
import tqdm.std


def _miwv_reporting(method, path=os.environ["MIWV_CELL_PROGRESS"], last=[0.0]):
    def reporting(self, *args, **kwargs):
        done = method(self, *args, **kwargs)
        if getattr(self, "disable", True) or (time.monotonic() - last[0] < 0.25 and method.__name__ != "close"):
            return done  # a disabled bar has no state to show
        last[0] = time.monotonic()
        try:
            with open(path + ".tmp", "w") as f:
                json.dump({"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit}, f)
            os.replace(path + ".tmp", path)
        except Exception:  # the terminal's copy of a bar must never break the cell that draws it
            pass
        return done
    return reporting


tqdm.std.tqdm.update = _miwv_reporting(tqdm.std.tqdm.update)
tqdm.std.tqdm.close = _miwv_reporting(tqdm.std.tqdm.close)
"""


@contextmanager
def _cell_progress(directory: str, enabled: bool) -> Iterator[None]:
    """Show, under the notebook's bar, the progress bar the running cell draws inside the kernel."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    startup = Path(directory, "ipython", "profile_default", "startup")
    startup.mkdir(parents=True)
    (startup / "00-miwv-cell-progress.py").write_text(_CELL_PROGRESS_STARTUP, encoding="utf-8")
    state, stop = Path(directory, "cell-progress.json"), threading.Event()
    bar = tqdm(total=None, desc="  cell", leave=False)

    seen: dict = {}

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


_WIDGET_VIEW, _WIDGET_STATE = "application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json"


def _progress_text(state: Mapping[str, dict], model_id: str) -> tuple[str, bool] | None:
    """(final text, hidden) of a tqdm notebook bar (HBox of HTML, FloatProgress, HTML); None for other widgets."""
    import html

    model = state.get(model_id)
    if not model or model.get("model_name") != "HBoxModel":
        return None
    children = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in model["state"].get("children", [])]
    if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (c["state"] for c in children)
    done = bar.get("value") or 0.0
    total = bar.get("max") or 0.0
    filled = int(10 * done / total) if total else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    layout = state.get(model["state"].get("layout", "").removeprefix("IPY_MODEL_"), {}).get("state", {})
    return html.unescape(text).replace("\u2007", " "), layout.get("visibility") == "hidden"


def settle_progress_bars(path: str | Path) -> None:
    """Make an executed notebook's progress bars read as they ended, outside Jupyter too.

    A tqdm bar is a widget whose plain-text fallback was captured when it was created ("0%"); GitHub,
    nbviewer and ``nbconvert`` show that fallback. The widget state saved with the notebook holds the
    final text: put it in the fallback, and drop the bars tqdm had hidden (``leave=False``).
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    state = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    if not state:
        return
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(_WIDGET_VIEW)
            settled = _progress_text(state, view["model_id"]) if view else None
            if settled is None:
                kept.append(output)
            elif not settled[1]:
                output["data"]["text/plain"] = settled[0]
                kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    with atomic_open(path) as handle:
        nbformat.write(nb, handle)


def _notebook_failure(stem: str, exc: Exception, partial: Path, final: Path) -> PipelineError:
    saved = final if partial.exists() or final.exists() else None
    where = f"; the executed notebook is saved at {saved}" if saved else ""
    cell = getattr(exc, "cell_index", None)
    if cell is not None:
        first_line = next((line for line in (exc.source or "").splitlines() if line.strip()), "")
        message = (f"notebook {stem} failed in cell {cell} (execution count {exc.exec_count}"
                   f"{', which starts: ' + first_line.strip()[:80] if first_line else ''}): "
                   f"{exc.ename}: {exc.evalue}{where}")
        return PipelineError(message, notebook=stem, cell_index=cell, exec_count=exc.exec_count, executed_path=saved)
    message = f"notebook {stem} failed before finishing: {type(exc).__name__}: {exc}{where}"
    error = PipelineError(message, notebook=stem, executed_path=saved)
    error.__cause__ = exc
    return error
