"""How a model dir is written and read: the one writer/reader used by every command that makes one
(train-decoder, finetune, train-scst, import-im2txt) and every command that reads one (caption, evaluate,
export, finetune, train-scst), with its last or its best weights (`--weights last|best`).

Files: config.json, word_counts.txt, decoder.weights.h5 (+ cnn.weights.h5 when the CNN was fine-tuned or
imported), and, from training, checkpoints/, logs/, metrics.jsonl.
config.json = {"format": "showtell-model", "version": 1, "model": ModelConfig dict, "vocab_size": int,
               "vocab": {"words": int, "sha256": hex of word_counts.txt's bytes}, "cnn": CNN block,
               "command": the command that writes the dir, ...that command's blocks ("train", "data", ...)}
              + "arch": "attend" for an attention decoder (decoder.arches; absent: Show and Tell).
Life cycle of a training run: `prepare_run_dir` (refuse a dir holding another run, or clear it with
--overwrite) -> `start_run_dir` (the run's vocabulary and config, so a killed run resumes) -> the loop's
checkpoints -> `save_model_dir` (final weights, then config.json last). `load_model_dir` checks the
vocabulary's digest, so a changed word_counts.txt is refused instead of giving nonsense captions, and
refuses NaN/Inf weights. `--weights best` loads the decoder of checkpoints/best.npz (the training loop's
best validation score) instead of decoder.weights.h5; `LoadedModel.weights` says which, with their step and
validation scores, and every command that reads a model dir prints it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from base.atomic import atomic_path, atomic_write_json
from base.digest import file_sha256
from base.errors import InputError
from base.outputs import MODEL_FORMAT
from data.integrity import describe_nonfinite, nonfinite_weights
from data.vocab import Vocabulary
from decoder.arches import DEFAULT, arch_name, build_model, grid_shape, model_config_from
from decoder.config import ModelConfig
from decoder.model import ShowAndTell
from decoder.train.checkpoints import assign, read_checkpoint
from decoder.train.config import recipe_differences
from extract.encoder import CNNSpec, build_encoder, check_fingerprint, check_same_cnn, weights_fingerprint
from extract.inputs import check_output_dir
from extract.preprocess import resize_size

FORMAT_NAME = MODEL_FORMAT
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "word_counts.txt"
DECODER_WEIGHTS = "decoder.weights.h5"
CNN_WEIGHTS = "cnn.weights.h5"
RUN_FILES = (CONFIG_FILE, VOCAB_FILE, DECODER_WEIGHTS, CNN_WEIGHTS, "metrics.jsonl")  # what a run writes
RUN_DIRS = ("checkpoints", "logs")
BEST_CHECKPOINT = "checkpoints/best.npz"  # the training loop's checkpoint of the best validation score
WEIGHTS = ("last", "best")  # --weights: the run's final decoder weights, or its best checkpoint's


@dataclass
class WeightsUsed:
    """Which decoder weights `load_model_dir` loaded (printed by every command that reads a model dir)."""

    choice: str  # "last" (decoder.weights.h5: the run's final step) or "best" (checkpoints/best.npz)
    path: Path  # the file they were read from
    step: int | None  # the training step they come from (None: not recorded)
    metrics: dict  # validation metrics at that step, e.g. {"val_cider": 1.2} ({}: none recorded)

    def describe(self) -> str:
        """One line: "weights: best (m/checkpoints/best.npz): step 200, val_cider 1.234"."""
        scores = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        step = f"step {self.step}" if self.step is not None else "step not recorded"
        return (f"weights: {self.choice} ({self.path}): {step}, "
                f"{scores or 'no validation score recorded'}")


@dataclass
class LoadedModel:
    """What `load_model_dir` returns."""

    model: ShowAndTell  # the decoder with its trained weights
    config: dict  # the whole config.json
    vocab: Vocabulary
    cnn: dict  # the CNN block (arch, weights, seed, image_size, resize_size, fingerprint)
    cnn_weights_path: Path | None  # cnn.weights.h5 when the CNN was fine-tuned or imported
    model_dir: Path
    weights: WeightsUsed | None = None  # which decoder weights were loaded (--weights last|best)

    @property
    def image_size(self) -> int:
        """The CNN's input size S in pixels (299, im2txt's, when the CNN block does not say)."""
        return int(self.cnn.get("image_size") or 299)


def vocab_block(path: Path) -> dict:
    """{"words": ids in the vocabulary file (with <UNK>), "sha256": digest of its bytes}."""
    return {"words": len(Vocabulary.load(path)), "sha256": file_sha256(path)}


def read_config(model_dir: Path) -> dict | None:
    """The model dir's config.json, None when absent; InputError when unreadable or of another format."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"{path} is not a readable JSON model config ({err}).") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not a showtell model config.")
    if config.get("version") != FORMAT_VERSION:
        raise InputError(f"{path} has model-dir version {config.get('version')!r}; this showtell reads "
                         f"version {FORMAT_VERSION}.")
    return config


def make_config(model_config: ModelConfig, vocab: Vocabulary, cnn: dict, command: str,
                extra: dict | None = None) -> dict:
    """The config.json content of a model dir written by `command` (the "vocab" digest block is added
    when the vocabulary file is written: start_run_dir, save_model_dir)."""
    config = dict(extra or {})
    config.update({"format": FORMAT_NAME, "version": FORMAT_VERSION, "command": command,
                   "model": model_config.to_dict(), "vocab_size": len(vocab), "cnn": dict(cnn or {})})
    if arch_name(model_config) != DEFAULT:  # a Show and Tell config.json stays as it was
        config["arch"] = arch_name(model_config)
    return config


def clear_run(out: Path) -> None:
    """Remove what a previous run wrote in `out` (for --overwrite); other files are left alone."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for sub in [*RUN_DIRS, *[p.name for p in out.glob("worker-*")]]:
        shutil.rmtree(out / sub, ignore_errors=True)


def prepare_run_dir(out, config: dict, identity: tuple[str, ...], overwrite: bool, option: str) -> None:
    """Check `out` before a run: a dir holding another run (another command, or `identity` blocks of
    config.json or resume-relevant recipe settings that differ) is refused unless `overwrite`, which
    clears it. Never cleared: a folder without our config.json, or a model dir of another command
    (base.outputs: --overwrite replaces only a model dir of the same command)."""
    out = Path(out)
    saved = read_config(out) if out.is_dir() else None
    if saved is None:
        return
    if overwrite and saved.get("command", config["command"]) != config["command"]:
        raise InputError(f"{option} {out} is a model dir written by `{saved.get('command')}`, not by "
                         f"`{config['command']}`: --overwrite never replaces it; give a new folder.")
    diffs = ["command"] if saved.get("command", config["command"]) != config["command"] else []
    diffs += [k for k in (*identity, "arch") if saved.get(k) != config.get(k)]
    diffs += [f"train.{k}" for k in recipe_differences(saved.get("train", {}), config.get("train", {}))]
    if overwrite:
        clear_run(out)
    elif diffs:
        raise InputError(f"{option} {out} holds a different run (different configuration: "
                         f"{', '.join(diffs)}): use another {option}, or --overwrite to start it afresh.")


def derived_run_dirs(source_dir, out) -> tuple[Path, Path]:
    """(source, out) of a command that writes a new model dir from a trained one (finetune, train-scst):
    InputError when --out is the source itself or cannot be written."""
    source_dir, out = Path(source_dir), Path(out)
    if out.resolve() == source_dir.resolve():
        raise InputError(f"--out {out} is the trained model dir itself: give a new folder.")
    check_output_dir(out, "--out")
    return source_dir, out


def start_run_dir(out_dir: Path, vocab: Vocabulary, config: dict) -> None:
    """Write the run's vocabulary and config.json at its start (a killed run resumes from them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(out_dir / VOCAB_FILE)
    atomic_write_json(out_dir / CONFIG_FILE, {**config, "vocab": vocab_block(out_dir / VOCAB_FILE)})


def save_weights(model, path: Path) -> None:
    """`model.save_weights(path)` atomically (Keras wants a `.weights.h5` name, so the temp name keeps it)."""
    with atomic_path(path, ".weights.h5") as tmp:
        model.save_weights(str(tmp))


def save_model_dir(model_dir, model, model_config: ModelConfig, vocab: Vocabulary, cnn: dict,
                   extra: dict | None = None, cnn_weights_src=None, command: str = "api") -> Path:
    """Write word_counts.txt, decoder.weights.h5, optionally cnn.weights.h5, and config.json last.

    cnn_weights_src: None, a path to a `.weights.h5` file (copied), or a Keras model (its save_weights).
    command: the command writing the dir ("api" for a Python caller). Returns the model dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(model_dir / VOCAB_FILE)
    save_weights(model, model_dir / DECODER_WEIGHTS)
    if hasattr(cnn_weights_src, "save_weights"):
        save_weights(cnn_weights_src, model_dir / CNN_WEIGHTS)
    elif cnn_weights_src is not None:
        with atomic_path(model_dir / CNN_WEIGHTS) as tmp:
            shutil.copyfile(cnn_weights_src, tmp)
    config = make_config(model_config, vocab, cnn, command, extra)
    atomic_write_json(model_dir / CONFIG_FILE, {**config, "vocab": vocab_block(model_dir / VOCAB_FILE)})
    return model_dir


def check_vocab(model_dir: Path, config: dict) -> Vocabulary:
    """The model dir's vocabulary, refused (InputError) when it is not the one the model was trained with."""
    path = model_dir / VOCAB_FILE
    vocab = Vocabulary.load(path)
    want = config.get("vocab") or {}
    if want.get("sha256") and file_sha256(path) != want["sha256"]:
        raise InputError(f"{path} changed after the model was trained ({len(vocab)} words now, "
                         f"{want.get('words')} then; its digest differs): restore the original file.")
    return vocab


def load_model_dir(model_dir, weights: str = "last") -> LoadedModel:
    """Rebuild the decoder from a model dir with its "last" (decoder.weights.h5) or "best"
    (checkpoints/best.npz) weights; InputError naming the file when something is missing, wrong, or holds
    NaN/Inf weights."""
    if weights not in WEIGHTS:
        raise InputError(f"--weights {weights!r} is not one of {', '.join(WEIGHTS)}.")
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise InputError(f"Model dir {model_dir} is a file, not a folder (a model dir is the folder "
                         "train-decoder, finetune, train-scst or import-im2txt wrote).")
    if not model_dir.is_dir():
        raise InputError(f"Model dir {model_dir} does not exist.")
    config = read_config(model_dir)
    if config is None:
        raise InputError(f"{model_dir} has no {CONFIG_FILE}: not a trained model dir.")
    if weights == "last" and not (model_dir / DECODER_WEIGHTS).exists():
        raise InputError(f"{model_dir / DECODER_WEIGHTS} is missing: the model dir holds no trained decoder "
                         "yet.")
    vocab = check_vocab(model_dir, config)
    model_config = model_config_from(config)
    # An imported im2txt model has more embedding rows (12000) than vocabulary ids (11520): the extra rows
    # are never produced by encode() and decode to <UNK>. Fewer rows than ids cannot work.
    if len(vocab) > model_config.vocab_size:
        raise InputError(f"{model_dir / VOCAB_FILE} has {len(vocab)} words but the model was built for "
                         f"{model_config.vocab_size}.")
    model = build_model(model_config)
    used = load_best(model, model_dir) if weights == "best" else load_last(model, model_dir, config)
    bad = nonfinite_weights((v.path, v.numpy()) for v in model.weights)
    if bad:
        raise InputError(f"{used.path} holds {describe_nonfinite(bad)}: these weights cannot caption "
                         "anything; the model dir is damaged or its run diverged.")
    cnn_path = model_dir / CNN_WEIGHTS
    return LoadedModel(model=model, config=config, vocab=vocab, cnn=dict(config.get("cnn") or {}),
                       cnn_weights_path=cnn_path if cnn_path.exists() else None, model_dir=model_dir,
                       weights=used)


def _val_scores(metrics: dict) -> dict:
    """The validation scores of a metrics dict ({"val_cider": 1.2, ...}; counts such as val_words left
    out)."""
    return {k: float(v) for k, v in (metrics or {}).items()
            if k.startswith("val_") and k not in ("val_words", "val_caption_length")
            and isinstance(v, (int, float))}


def load_last(model, model_dir: Path, config: dict) -> WeightsUsed:
    """Load decoder.weights.h5 (the final weights of the run that wrote the dir) into `model`."""
    path = model_dir / DECODER_WEIGHTS
    try:
        model.load_weights(str(path))
    except (ValueError, OSError) as err:
        raise InputError(f"{path} does not fit the model in {CONFIG_FILE} ({err}).") from None
    result = config.get("result") or {}
    step = result.get("step", (config.get("import") or {}).get("global_step"))
    return WeightsUsed("last", path, None if step is None else int(step), _val_scores(result))


def load_best(model, model_dir: Path) -> WeightsUsed:
    """Load the decoder of checkpoints/best.npz (the run's best validation score) into `model`;
    InputError when the dir has none (an import, or a run that never validated) or it does not fit."""
    path = model_dir / BEST_CHECKPOINT
    if not path.is_file():
        raise InputError(f"--weights best: {model_dir} has no best checkpoint ({BEST_CHECKPOINT}; only "
                         "training runs that validated keep one): use --weights last.")
    arrays = read_checkpoint(path)
    if any(name.startswith("cnn/") for name in arrays):
        raise InputError(f"--weights best: {path} is a finetune checkpoint whose CNN differs from the dir's "
                         f"{CNN_WEIGHTS}; only decoder-only runs (train-decoder, train-scst) can use their "
                         "best checkpoint: use --weights last.")
    decoder = {k: v for k, v in arrays.items() if k.startswith("decoder/") or k == "meta"}
    meta = assign(path, decoder, {"decoder": model}, [])
    step = None if meta.get("step") is None else int(meta["step"])
    return WeightsUsed("best", path, step, _val_scores(meta.get("val_metrics")))


def cnn_spec(loaded: LoadedModel, image_size: int | None = None) -> CNNSpec:
    """The model dir's CNN as a CNNSpec: its CNN block, with the dir's cnn.weights.h5 (fine-tuned or
    imported) as weights when present, at `image_size` when given. InputError when no CNN is recorded."""
    if not loaded.cnn or not loaded.cnn.get("arch"):
        raise InputError(f"{loaded.model_dir / CONFIG_FILE} has no CNN record: it was trained from a "
                         "feature store without a CNN block, so it can only caption --features (and cannot "
                         "be fine-tuned).")
    spec = CNNSpec.from_dict(loaded.cnn)
    if loaded.cnn_weights_path is not None:
        spec.weights = str(loaded.cnn_weights_path)
    if image_size:
        spec.image_size, spec.resize_size = int(image_size), resize_size(int(image_size))
    return spec


def check_store_fits(store, loaded: LoadedModel, store_name) -> None:
    """InputError unless a feature store can feed the model dir's decoder: the same CNN (fingerprint, image
    size) and the feature width the decoder takes."""
    check_same_cnn(store.cnn, loaded.cnn, store_name, loaded.model_dir)
    check_grid_fits(store, loaded.model.config, store_name, loaded.model_dir)
    if store.dim != loaded.model.config.feature_dim:
        raise InputError(f"feature store {store_name} has {store.dim}-d features but the model in "
                         f"{loaded.model_dir} takes {loaded.model.config.feature_dim}-d ones.")


def check_grid_fits(store, model_config, store_name, model_name) -> None:
    """InputError unless the store holds the grid an attention decoder reads (pooled-only stores, or grids
    of another size, are refused); nothing to check for a decoder of pooled features."""
    want = grid_shape(model_config)
    if want is None:
        return
    if store.grid_shape is None:
        raise InputError(f"feature store {store_name} holds pooled features only, but the attention model "
                         f"{model_name} reads the CNN grid: extract the images with --grid.")
    if tuple(store.grid_shape) != tuple(want):
        raise InputError(f"feature store {store_name} holds {store.grid_shape[0]}x{store.grid_shape[1]} "
                         f"grids but the attention model {model_name} reads {want[0]}x{want[1]} ones "
                         "(another --image-size).")


def load_cnn(loaded, image_size: int | None = None, grid: bool = False):
    """(InceptionV3 with the model dir's CNN weights, its CNN block with the fingerprint) — InputError when
    the dir records no CNN, it cannot be built, or it does not reproduce the recorded fingerprint. With
    `grid` the network ends at the Mixed_7c map [B, h, w, D] (extract.encoder.build_encoder)."""
    spec = cnn_spec(loaded, image_size)
    try:
        model = build_encoder(spec, grid)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is a bad model dir
        raise InputError(f"The CNN of {loaded.model_dir} cannot be rebuilt ({err}).") from None
    got = weights_fingerprint(model)
    check_fingerprint(got, loaded.cnn.get("fingerprint", ""), f"the CNN rebuilt from {spec.weights}",
                      str(loaded.model_dir / "config.json"))
    return model, {**spec.to_dict(), "fingerprint": got}
