"""THE output rule of every command (docs/bad-input.md, "Never destroy: the output rule"):

1. A command never deletes or replaces a file or folder it did not write. An output that already exists must
   be something showtell wrote, of the kind that option writes (recognised by its content, `_FILE_KINDS`):
   a feature store (HDF5 with format attr "showtell-features"), a model dir of the same command (config.json
   "showtell-model" with that "command"), a SavedModel export (the `assets.extra/showtell-export.json` marker,
   or, for older exports, the bare SavedModel layout with our `caption_features` signature), a results JSON
   ([{image_id, caption[, file_name]}]), a metrics JSON (format "showtell-metrics"), an HTML report (our
   generator meta tag) or a demo workdir (its demo.json). Anything else is refused with one line before any
   work; `--overwrite` (where a command has it) replaces only such an output, and the command says what it
   replaces (`check_command` returns those notes).
2. No output may be, contain, or sit inside one of the command's inputs (resolved paths, symlinks and hard
   links included), and no two outputs may be the same path or nested. An output may sit in an input
   *folder* (evaluate's default MODEL_DIR/eval-test, a store beside the images) as long as it is not one of
   the files or folders the command reads there (a model dir's config.json, weights, checkpoints/, ...).

Every check reads the filesystem only (json, and h5py for a store's attrs): cli.py runs `check_command`
before TensorFlow is imported, and the package functions (export, merge-features, evaluate, demo) run it
again for Python callers. `COMMANDS` maps each command to its output and input options (cli.py's names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from base.errors import InputError

STORE_FORMAT = "showtell-features"  # a feature store's "format" attr (data.features.FORMAT_NAME is this)
MODEL_FORMAT = "showtell-model"  # a model dir's config.json "format" (decoder.modeldir.FORMAT_NAME is this)
METRICS_FORMAT = "showtell-metrics"  # a metrics JSON's "format" (evaluation.metrics writes it)
EXPORT_MARKER = "assets.extra/showtell-export.json"  # written by decoder.infer.export into every export
REPORT_MARKER = '<meta name="generator" content="showtell evaluate --report">'  # evaluation.report writes it
DEMO_MARKER = "demo.json"  # the settings of the demo that made a workdir (decoder/demo.py writes it)
# what the demo writes in its workdir (and --fresh removes)
DEMO_OWNED = ("shapes", "features.h5", "model", "eval", "model-scst", "eval-scst", "report.html",
              "model-attend", "eval-attend", "report-attend.html", "heatmaps", DEMO_MARKER)
MODEL_MEMBERS = ("config.json", "word_counts.txt", "decoder.weights.h5", "cnn.weights.h5", "metrics.jsonl",
                 "checkpoints", "logs")  # what a command reads (or resumes from) in a model dir
_SAVEDMODEL = {"saved_model.pb", "variables", "assets", "assets.extra", "fingerprint.pb"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class Output:
    """One output of a command: the option naming it, its path and the kind it must be when it exists."""

    option: str  # e.g. "--out"
    path: Path
    kind: str  # store | model | export | results | metrics | report
    command: str = ""  # kind "model": the command that writes it
    overwrite: bool | None = None  # None: the command has no --overwrite (an output of ours is replaced)
    resumes: bool = False  # an output of ours is resumed (extract), not replaced: no note


def _json(path: Path):
    """The parsed JSON content of `path` (at most 64 MiB read), None when it is not readable JSON."""
    try:
        with path.open("rb") as handle:
            return json.loads(handle.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return None


def _is_hdf5(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(8) == _HDF5_MAGIC
    except OSError:
        return False


def _is_store(path: Path) -> bool:
    if not _is_hdf5(path):
        return False
    try:
        import h5py  # here, not at the top: 0.4 s that cli.py's start-up (and --help) does not pay

        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == STORE_FORMAT
    except Exception:  # unreadable or damaged: not recognisably ours
        return False


def _is_results(path: Path) -> bool:
    data = _json(path)
    return isinstance(data, list) and all(
        isinstance(r, dict) and {"image_id", "caption"} <= set(r) <= {"image_id", "caption", "file_name"}
        for r in data)


def _is_report(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return False
    # reports written before the marker: our metrics table and our heading
    return REPORT_MARKER in head or ('<table class="metrics">' in head
                                     and "<h2>Images, worst CIDEr first</h2>" in head)


def _is_export(path: Path) -> bool:
    if (path / EXPORT_MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir()}
    if "saved_model.pb" not in names or not names <= _SAVEDMODEL:
        return False
    try:  # an export written before the marker: our signature name is in the graph
        return b"caption_features" in (path / "saved_model.pb").read_bytes()
    except OSError:
        return False


def _model_command(path: Path) -> str | None:
    config = _json(path / "config.json")
    if isinstance(config, dict) and config.get("format") == MODEL_FORMAT:
        return str(config.get("command", ""))
    return None


def _is_demo(path: Path) -> bool:
    marker = _json(path / DEMO_MARKER)
    return isinstance(marker, dict) and {"n_images", "steps", "scst_steps"} <= set(marker)


def _is_metrics(path: Path) -> bool:
    data = _json(path)
    return isinstance(data, dict) and data.get("format") == METRICS_FORMAT


_FILE_KINDS = {"store": ("a feature store", _is_store), "results": ("a results JSON", _is_results),
               "metrics": ("a metrics JSON", _is_metrics), "report": ("an HTML report", _is_report)}
_FOLDER_KINDS = {"model": "a model dir", "export": "a SavedModel export"}


def _only_leftovers(path: Path) -> bool:
    """True when a folder is empty or holds only a lock file / temp files of an earlier run of ours."""
    return all(p.name == ".lock" or ".tmp-" in p.name for p in path.iterdir())


def check_replaceable(out: Output) -> str | None:
    """None when `out.path` does not exist (or is an empty folder); a note "replacing ..." / "resuming ..."
    when it is an output of ours of `out.kind`; InputError (one line) otherwise."""
    path, option = out.path, out.option
    if not path.exists() and not path.is_symlink():
        return None
    if out.kind in _FILE_KINDS:
        what, is_ours = _FILE_KINDS[out.kind]
        if path.is_dir():
            raise InputError(f"{option} {path} is a folder; give a file name.")
        if not is_ours(path):
            hdf5 = out.kind == "store" and _is_hdf5(path)
            raise InputError(f"{option} {path} exists and is not {what} written by showtell"
                             f"{' (another HDF5 file, or a damaged store)' if hdf5 else ''}: it is never "
                             "replaced; give a new name or move that file away.")
        if out.resumes:
            return None
        if out.overwrite is False:
            raise InputError(f"{option} {path} already holds {what}: use another name, or --overwrite to "
                             "replace it.")
        return f"replacing {path} ({what} written by showtell)"
    if not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder: give a new or empty folder.")
    if _only_leftovers(path):
        return None
    return _check_folder(out)


def _check_folder(out: Output) -> str | None:
    path, option, what = out.path, out.option, _FOLDER_KINDS[out.kind]
    if out.kind == "model":
        command = _model_command(path)
        if command is None:
            raise InputError(f"{option} {path} is a folder that showtell did not write (no showtell "
                             "config.json): it is never written into; give a new or empty folder.")
        if command != out.command:
            raise InputError(f"{option} {path} already holds a model dir written by "
                             f"`{command or 'unknown'}`, not by `{out.command}`: it is never replaced; "
                             "give a new folder.")
        return f"replacing {path} ({what} of `{command}`)" if out.overwrite else None
    if not _is_export(path):
        raise InputError(f"{option} {path} is not empty and is not a showtell export: it is never "
                         "replaced; give a new folder (TF Serving: a new version number).")
    if not out.overwrite:
        raise InputError(f"{option} {path} is not empty (it holds an export): use another folder (TF "
                         "Serving: a new version number), or --overwrite to replace it.")
    return f"replacing {path} ({what} written by showtell)"


def check_demo_workdir(workdir, fresh: bool) -> None:
    """The demo's workdir: a file, `--fresh` in a non-empty folder that never held a demo, or a folder
    without the demo's marker holding files by the demo's names (DEMO_OWNED), are refused."""
    path, option = Path(workdir), "--workdir"
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder.")
    if not path.is_dir() or _is_demo(path):
        return
    clash = sorted(name for name in DEMO_OWNED if (path / name).exists())
    if clash:
        raise InputError(f"{option} {path} never held a demo (no {DEMO_MARKER}) but has {', '.join(clash)}: "
                         "the demo never replaces files it did not write; give a new folder.")
    if fresh and any(path.iterdir()):
        raise InputError(f"{option} {path} never held a demo (no {DEMO_MARKER}): --fresh removes only what a "
                         "demo wrote; drop --fresh or give a new folder.")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    return _real(outer) in _real(inner).parents


def check_apart(outputs: list[Output], inputs: list[tuple[str, Path, bool]]) -> None:
    """InputError when an output is, contains or sits inside an input, or two outputs collide.
    inputs: (option, path, folder_may_hold_outputs): True for a folder an output may be placed in (a model
    dir, an images root), False for a file or a folder read whole."""
    for out in outputs:
        for option, path, hold_ok in inputs:
            if _same(out.path, path):
                raise InputError(f"{out.option} {out.path} is the input {option} {path}: an output never "
                                 "replaces an input; give another path.")
            if _inside(path, out.path):
                raise InputError(f"{out.option} {out.path} contains the input {option} {path}: an output "
                                 "never replaces an input; give another path.")
            if not hold_ok and _inside(out.path, path):
                raise InputError(f"{out.option} {out.path} sits inside the input {option} {path}; give "
                                 "another path.")
    for i, a in enumerate(outputs):
        for b in outputs[i + 1:]:
            if _same(a.path, b.path) or _inside(a.path, b.path) or _inside(b.path, a.path):
                raise InputError(f"{a.option} {a.path} and {b.option} {b.path} collide: each output "
                                 "needs its own path.")


# ---- each command's outputs and inputs, by cli.py's option names -------------------------------------------

def _given(value) -> list[Path]:
    """An option's paths: None / "" -> [], a str -> [it], a tuple or list -> its items."""
    if not value:
        return []
    return [Path(v) for v in ([value] if isinstance(value, str | os.PathLike) else value)]


def _model_input(option: str, model_dir) -> list[tuple[str, Path, bool]]:
    """A model dir read by a command: the folder (outputs may sit in it) and the members it reads."""
    path = Path(model_dir)
    if not path.exists():
        raise InputError(f"Model dir {path} does not exist.")
    if not path.is_dir():
        raise InputError(f"Model dir {path} is a file, not a folder (a model dir is the folder "
                         "train-decoder, finetune, train-scst or import-im2txt wrote).")
    return [(option, path, True), *((option, path / m, False) for m in MODEL_MEMBERS)]


def _files(option: str, value, folders_hold: bool = True) -> list[tuple[str, Path, bool]]:
    return [(option, p, folders_hold and p.is_dir()) for p in _given(value)]


def _weights(option: str, value) -> list[tuple[str, Path, bool]]:
    """--cnn-weights: a file (or slim:CKPT prefix) when it names one; imagenet / none read no file."""
    if not value or value in ("imagenet", "none"):
        return []
    return _checkpoint(option, value[5:] if value.startswith("slim:") else value)


def _checkpoint(option: str, value) -> list[tuple[str, Path, bool]]:
    """A TF checkpoint given as a prefix (PATH/model.ckpt-N), its .index file or its folder."""
    path = Path(value)
    found = [(option, path, path.is_dir())]
    if not path.is_dir():
        found += [(option, p, False) for p in path.parent.glob(glob_escape(path.name) + ".*")]
    return found


def glob_escape(name: str) -> str:
    """`name` with glob's special characters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


_READERS = {"model_dir": ("--model-dir", _model_input),
            "features": ("--features", _files), "captions": ("--captions", _files),
            "images": ("--images", _files), "paths": ("PATHS", _files), "vocab": ("--vocab", _files),
            "shards": ("SHARDS", lambda o, v: _files(o, v, folders_hold=False)),
            "cnn_weights": ("--cnn-weights", _weights), "checkpoint": ("--checkpoint", _checkpoint)}


def _inputs(p: dict, *names: str) -> list[tuple[str, Path, bool]]:
    """The inputs named by the parameters `names` (cli.py's names, see _READERS) that were given."""
    found = []
    for name in names:
        option, read = _READERS[name]
        if p.get(name):
            found += read(option, p[name])
    return found


def _model_out(p: dict, option: str, key: str, command: str) -> Output:
    return Output(option, Path(p[key]), "model", command=command, overwrite=bool(p.get("overwrite")))


def _evaluate_outputs(p: dict) -> list[Output]:
    """evaluate's results, metrics and report (defaults as decoder.infer.evaluate.EvalConfig.paths)."""
    out_dir = Path(p["out_dir"] or Path(p["model_dir"]) / f"eval-{p.get('split') or 'test'}")
    found = [Output("--results" if p.get("results") else "--out-dir",
                    Path(p.get("results") or out_dir / "results.json"), "results"),
             Output("--metrics" if p.get("metrics") else "--out-dir",
                    Path(p.get("metrics") or out_dir / "metrics.json"), "metrics")]
    return found + ([Output("--report", Path(p["report"]), "report")] if p.get("report") else [])


COMMANDS = {  # command -> params -> (outputs, inputs)
    "extract": lambda p: ([Output("--out", Path(p["out"]), "store", resumes=True)],
                          _inputs(p, "paths", "images", "captions", "cnn_weights")),
    "merge-features": lambda p: ([Output("--out", Path(p["out"]), "store",
                                         overwrite=bool(p.get("overwrite")))], _inputs(p, "shards")),
    "train-decoder": lambda p: ([_model_out(p, "--model-dir", "model_dir", "train-decoder")],
                                _inputs(p, "features", "captions", "vocab")),
    "finetune": lambda p: ([_model_out(p, "--out", "out", "finetune")],
                           _inputs(p, "model_dir", "images", "captions")),
    "train-scst": lambda p: ([_model_out(p, "--out", "out", "train-scst")],
                             _inputs(p, "model_dir", "features", "captions")),
    "import-im2txt": lambda p: ([_model_out(p, "--out", "out", "import-im2txt")],
                                _inputs(p, "checkpoint", "vocab", "cnn_weights")),
    "caption": lambda p: ([Output("--json", Path(p["json_out"]), "results")] if p.get("json_out") else [],
                          _inputs(p, "model_dir", "paths", "features")),
    "evaluate": lambda p: (_evaluate_outputs(p), _inputs(p, "model_dir", "features", "images", "captions")),
    "export": lambda p: ([Output("--out", Path(p["out"]), "export", overwrite=bool(p.get("overwrite")))],
                         _inputs(p, "model_dir")),
}


def check_command(command: str, params: dict) -> list[str]:
    """Apply the rule to one command's options (cli.py's parameter names); InputError before any work.
    Returns the notes to print ("replacing X (...)") for outputs of ours that will be replaced."""
    if command == "demo":
        check_demo_workdir(params["workdir"], bool(params.get("fresh")))
        return []
    plan = COMMANDS.get(command)
    if plan is None:
        return []
    outputs, inputs = plan(params)
    check_apart(outputs, inputs)
    return [note for note in map(check_replaceable, outputs) if note]

