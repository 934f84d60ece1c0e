"""`export`: a model dir -> a self-contained SavedModel (image bytes -> captions) for TF Serving,
`tf.saved_model.load` in any Python, or `saved_model_cli`; it needs TensorFlow only, not this project.

Signatures (N = any batch size, T = ExportConfig.top):
  serving_default(images tf.string [N]: encoded JPEG / PNG / GIF / BMP / WebP bytes)
      -> captions tf.string [N, T], log_probs float32 [N, T], ok bool [N]
  caption_features(features float32 [N, D]: the CNN's pooled features, as in a feature store)
      -> the same outputs.
Attention model dirs (--arch attend): caption_features takes the grid float32 [N, h, w, D] (as /grid of a
store), and both signatures also return attention float32 [N, T, max_length - 1, h*w]: for each caption, the
weights over the grid while each of its words was emitted (row j: word j + 1; rows past its words are 0).
captions: each row's best T captions, words joined by spaces without <S> / </S> (as Vocabulary.decode),
best first; log_probs: their natural-log probabilities. A slot without a caption is "" with log-prob -inf.
ok is False for a row whose bytes are not a decodable image (export_decode.decode_batch drops it; the rest
of the batch is captioned) or that got no caption at all (every word had p < 1e-12); its captions are "".

Inside the graph: export_decode (PIL-equivalent decoding, then THE preprocessing function), the model dir's
CNN (decoder.modeldir.load_cnn: fine-tuned / imported weights when present, fingerprint-checked),
ShowAndTell.initial_state (feature normalisation included) and the beam search as one tf.while_loop
(beam.graph.graph_beam_search: beam/'s semantics over ShowAndTell.step), the vocabulary as a constant.
The SavedModel is written to a temp folder beside --out and renamed into place, under an exclusive lock
on `<out>.lock`; it carries the marker `assets.extra/showtell-export.json`. An existing --out is replaced
only with `overwrite` and only when it is an export of ours, never the model dir or a folder holding it
(base.outputs).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tensorflow as tf

from base.atomic import atomic_write_json, fsync_dir, fsync_path, temp_name
from base.devices import dtype_policy, inference_precision
from base.errors import InputError
from base.locks import exclusive
from base.outputs import EXPORT_MARKER, check_command
from beam.common import check_common
from beam.graph import graph_beam_search
from decoder.arches import grid_shape
from decoder.infer.export_decode import decode_batch
from decoder.modeldir import cnn_spec, load_cnn, load_model_dir
from extract.inputs import check_output_dir

SIGNATURES = ("serving_default", "caption_features")


@dataclass
class ExportConfig:
    """The search baked into the exported graph (beam/'s defaults = im2txt's)."""

    beam_size: int = 3  # partial captions kept per image and words tried per partial (1 = greedy)
    max_length: int = 20  # most tokens per caption, counting <S> and </S>
    length_normalization: float = 0.0  # alpha: complete captions ranked by logprob / len ** alpha
    top: int = 3  # captions returned per image (<= beam_size)
    weights: str = "last"  # the model dir's "last" (decoder.weights.h5) or "best" (checkpoints/best.npz)

    def check(self) -> None:
        """InputError (one sentence) for settings the search cannot honour."""
        try:
            if self.beam_size < 1:
                raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
            check_common(self.max_length, self.length_normalization, 0, False, None)
        except ValueError as err:
            raise InputError(f"bad search option: {err}.") from None
        if not 1 <= self.top <= self.beam_size:
            raise InputError(f"--top {self.top} must be between 1 and --beam-size ({self.beam_size}): the "
                             "search returns at most beam-size captions per image.")


@dataclass
class ExportReport:
    """What `export_model` wrote."""

    out: Path  # the SavedModel folder
    seconds: float  # wall time of the whole export
    size_bytes: int  # bytes on disk of the SavedModel folder
    image_size: int  # the CNN's input size S baked into serving_default
    config: ExportConfig

    def summary(self) -> str:
        """One line."""
        c = self.config
        return (f"export: {self.out} | serving_default(images) + caption_features(features) -> captions "
                f"[N, {c.top}], log_probs, ok | {self.image_size} px, beam {c.beam_size}, max length "
                f"{c.max_length}, alpha {c.length_normalization:g} | {self.size_bytes / 1e6:.1f} MB | "
                f"{self.seconds:.1f} s")


def caption_graph(decoder, words: list[str], start_id: int, end_id: int, config: ExportConfig):
    """features float32 [M, D] -> (captions tf.string [M, T], log_probs float32 [M, T], found bool [M]):
    ShowAndTell.initial_state + graph_beam_search over ShowAndTell.step, token ids -> words (TF ops)."""
    def run(features):
        out = graph_beam_search(decoder.initial_state(features), decoder.step, start_id=start_id,
                                end_id=end_id, beam_size=config.beam_size, max_length=config.max_length,
                                length_normalization=config.length_normalization)
        tokens, lengths = out["tokens"][:, :config.top], out["lengths"][:, :config.top]
        extra = ({"attention": attention_graph(decoder, features, tokens, lengths, end_id)}
                 if grid_shape(decoder.config) else {})
        keep = tf.range(config.max_length) < lengths[:, :, None]
        keep = keep & tf.not_equal(tokens, start_id) & tf.not_equal(tokens, end_id)
        text = tf.gather(tf.constant(words), tokens)
        captions = tf.strings.reduce_join(tf.ragged.boolean_mask(text, keep), axis=-1, separator=" ")
        captions = tf.reshape(captions.to_tensor(default_value=""), [-1, config.top])  # [M, (T)] -> [M, T]
        log_probs = tf.cast(out["log_probs"][:, :config.top], tf.float32)
        return captions, log_probs, lengths[:, 0] > 0, extra

    return run


def attention_graph(decoder, features, tokens, lengths, end_id: int):
    """Attention decoder: the weights of the searched captions, float32 [M, T, L - 1, cells]: features float32
    [M, cells, D]; tokens int32 [M, T, L] (<S> first), lengths int32 [M, T]. Row j of a caption: the weights
    while its word j + 1 was emitted (decoder.attention_weights, teacher-forced); rows past its words: 0."""
    m, top, length = tf.shape(tokens)[0], tf.shape(tokens)[1], tf.shape(tokens)[2]
    cells = tf.shape(features)[1]
    flat = tf.reshape(tokens[:, :, :-1], [-1, length - 1])
    weights = decoder.attention_weights(tf.repeat(features, top, axis=0), flat)  # [M*T, L-1, cells]
    last = tf.gather(tokens, tf.maximum(lengths - 1, 0), batch_dims=2)  # [M, T]
    words = lengths - 1 - tf.cast(tf.equal(last, end_id) & (lengths > 1), tf.int32)  # [M, T]
    keep = tf.sequence_mask(tf.reshape(tf.maximum(words, 0), [-1]), length - 1, tf.float32)
    return tf.reshape(weights * keep[..., None], [m, top, length - 1, cells])


def _scatter(rows, n, values, fill):
    """values [M, ...] placed at `rows` (int32 [M]) of a [n, ...] tensor filled with `fill`."""
    base = tf.fill(tf.concat([[n], tf.shape(values)[1:]], 0), tf.constant(fill, values.dtype))
    return tf.tensor_scatter_nd_update(base, rows[:, None], values)


def _outputs(captions, log_probs, ok, top: int, extra: dict) -> dict:
    """The signature outputs, with their static shapes (saved_model_cli shows (-1, top))."""
    return {"captions": tf.ensure_shape(captions, [None, top]),
            "log_probs": tf.ensure_shape(log_probs, [None, top]), "ok": tf.ensure_shape(ok, [None]),
            **{k: tf.ensure_shape(v, [None, top, None, None]) for k, v in extra.items()}}


def build_module(cnn, decoder, vocab, image_size: int, config: ExportConfig) -> tf.Module:
    """A tf.Module holding the CNN's and the decoder's variables and the two signature functions
    (`serving_default`, `caption_features`; see the module docstring). cnn: a Keras InceptionV3
    (float32 [B, S, S, 3] -> [B, D]); decoder: ShowAndTell; vocab: data.vocab.Vocabulary."""
    words = [vocab.word(i) for i in range(decoder.config.vocab_size)]
    captions_of = caption_graph(decoder, words, vocab.start_id, vocab.end_id, config)
    top, dim, grid = config.top, decoder.config.feature_dim, grid_shape(decoder.config)
    shape = [*grid, dim] if grid else [dim]  # one image's CNN output: the grid (attend) or the pooled row
    as_cells = (lambda x: tf.reshape(x, [-1, grid[0] * grid[1], dim])) if grid else (lambda x: x)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def serving_default(images):
        n = tf.shape(images)[0]
        rows, pixels = decode_batch(images, image_size)
        features = tf.cond(tf.shape(pixels)[0] > 0, lambda: tf.cast(cnn(pixels, training=False), tf.float32),
                           lambda: tf.zeros([0, *shape], tf.float32))  # TF's conv fails on an empty batch
        captions, log_probs, found, extra = captions_of(as_cells(features))
        return _outputs(_scatter(rows, n, captions, ""), _scatter(rows, n, log_probs, float("-inf")),
                        _scatter(rows, n, found, False), top,
                        {k: _scatter(rows, n, v, 0.0) for k, v in extra.items()})

    spec = tf.TensorSpec([None, *shape], tf.float32, name="features")

    @tf.function(input_signature=[spec], autograph=False)
    def caption_features(features):
        captions, log_probs, found, extra = captions_of(as_cells(features))
        return _outputs(captions, log_probs, found, top, extra)

    module = tf.Module(name="showtell_captioner")
    # the tf.Variables under the Keras variables: TF1-style loaders (TF Serving, saved_model_cli run) restore
    # only variables the object graph holds as plain tf.Variables
    module.cnn_variables = [getattr(v, "value", v) for v in cnn.variables]
    module.decoder_variables = [getattr(v, "value", v) for v in decoder.variables]
    module.serving_default, module.caption_features = serving_default, caption_features
    return module


def export_model(model_dir, out, config: ExportConfig | None = None, overwrite: bool = False,
                 log=None) -> ExportReport:
    """Write the SavedModel of `model_dir` to `out` (atomically; see the module docstring). InputError
    before any work for a bad model dir, search setting, or an --out that exists and is not empty (unless
    `overwrite`). log(str): progress lines (optional)."""
    start = time.perf_counter()
    config = config or ExportConfig()
    config.check()
    out = Path(out)
    params = {"model_dir": str(model_dir), "out": str(out), "overwrite": overwrite}
    check_command("export", params)  # base.outputs: not the model dir, nor holding it, nor a foreign folder
    check_output_dir(out, "--out")
    loaded = load_model_dir(model_dir, config.weights)
    cnn_spec(loaded)  # InputError now when the model dir records no CNN (a features-only model)
    if log:
        log(loaded.weights.describe())
    with exclusive(out, folder=False, what=f"--out {out}"):
        check_command("export", params)  # again under the lock
        _remove_stale(out)
        with dtype_policy(inference_precision("export")):  # the graph's CNN computes in --precision
            attend = grid_shape(loaded.model.config) is not None  # the CNN up to Mixed_7c: its grid
            cnn, block = load_cnn(loaded, grid=True) if attend else load_cnn(loaded)
        image_size = int(block["image_size"])
        if log:
            log(f"tracing the graph (InceptionV3 at {image_size} px, beam search) ...")
        module = build_module(cnn, loaded.model, loaded.vocab, image_size, config)
        signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
        tmp = temp_name(out)
        try:
            tf.saved_model.save(module, str(tmp), signatures=signatures)
            _mark(tmp, config)
            _install(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(out, time.perf_counter() - start, size, image_size, config)


def _mark(tmp: Path, config: ExportConfig) -> None:
    """The marker by which `export --overwrite` recognises a folder as an export of ours (base.outputs):
    assets.extra/ is the SavedModel's place for extra files (TF Serving ignores what it does not know)."""
    atomic_write_json(tmp / EXPORT_MARKER, {"format": "showtell-export", "version": 1,
                                            "search": asdict(config)})


def _remove_stale(out: Path) -> None:
    """Delete `<out>.tmp-<pid>` / `<out>.old-<pid>` folders left by a killed export (dead pid)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f"{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """fsync every file of the written SavedModel, then rename it to `out` (an old `out` is moved aside
    first and deleted after)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
