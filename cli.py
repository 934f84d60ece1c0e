"""showtell command line: `python cli.py --help`.

Each command parses its options, calls one package function and prints. Nothing else reads argv or the
environment. A bad argument raises `base.errors.InputError`, printed as one sentence with exit status 2.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from base.devices import quiet_tensorflow  # noqa: E402  (imports no TensorFlow itself)
from base.errors import InputError, RunStopped  # noqa: E402
from data.formats import FORMATS  # noqa: E402  (standard library only: --help stays fast)
from data.splits import SPLIT_SCHEMES  # noqa: E402

__version__ = "0.1.0"


class _BadInput(click.ClickException):
    """Printed by click as `Error: <message>`; exit status 2 like click's own usage errors."""

    exit_code = 2


class _Stopped(click.ClickException):
    """Printed as `Error: <message>`; exit status 1: the run stopped without a right result."""

    exit_code = 1


class _Command(click.Command):
    """A command that starts TensorFlow quietly (no CUDA/oneDNN start-up noise on a CPU-only machine; real
    errors still shown) after its options were parsed and checked, so usage errors come back at once."""

    def invoke(self, ctx):
        for check in _PRECHECKS.get(self.name, ()):  # checks across options, still before TensorFlow
            check(ctx.params)
        if self.name not in _NO_TENSORFLOW:
            quiet_tensorflow()
        return super().invoke(ctx)


_NO_TENSORFLOW = {"merge-features"}
_PRECHECKS: dict = {}  # command name -> functions(params) raising click.UsageError (filled below)


class _Group(click.Group):
    """A click group that turns `InputError` into a one-line `Error: ...` and exit status 2, and
    `RunStopped` into `Error: ...` and exit status 1."""

    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            raise _BadInput(str(err)) from None
        except RunStopped as err:
            raise _Stopped(str(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="showtell")
def main():
    """showtell: train a Show and Tell (im2txt) image captioner from cached InceptionV3 features.

    Pipeline: extract -> train-decoder -> (finetune, train-scst) -> caption / evaluate / export. `demo`
    runs it all on a generated sample in a few minutes on a CPU.
    """


# ---- options shared by several commands ------------------------------------------------------------------
_FORMATS = ("auto", *FORMATS)
SEEDS = click.IntRange(0, 2**32 - 1)  # numpy's and keras.utils.set_random_seed's range
IMAGE_SIZES = click.IntRange(75, 2048)  # InceptionV3 needs >= 75 px; im2txt uses 299
MAX_BEAM = 64  # each step scores beam x beam x vocabulary candidates per image: beam 100000 took 33 s and
# 2.5 GB for one image; im2txt uses 3 and captions stop improving beyond ~10, so 64 leaves ample room


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses NaN and +-inf (FloatRange lets NaN through: every comparison with
    NaN is false). The range is checked while parsing, so the usage error comes before TensorFlow starts."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


def _options(*options):
    """A decorator applying click `options` in the order given (as if stacked top to bottom)."""

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def caption_options(required: bool, captions_help: str, scheme_help: str):
    """--captions (repeatable), --format and --split-scheme (see docs/captions.md)."""
    return _options(
        click.option("--captions", required=required, multiple=True, help=captions_help),
        click.option("--format", "caption_format", default="auto", show_default=True,
                     type=click.Choice(_FORMATS), help="Caption file format (auto: from the content)."),
        click.option("--split-scheme", default="auto", show_default=True, type=click.Choice(SPLIT_SCHEMES),
                     help=scheme_help))


search_options = _options(  # beam search as im2txt: --beam-size, --max-length, --length-normalization
    click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1, MAX_BEAM),
                 help=f"Beam size (1 = greedy; im2txt: 3; at most {MAX_BEAM}: the work per image grows with "
                      "its square)."),
    click.option("--max-length", default=20, show_default=True, type=click.IntRange(2, 1000),
                 help="Most tokens per caption, counting <S> and </S> (im2txt: 20; >= 2)."),
    click.option("--length-normalization", default=0.0, show_default=True, type=FiniteRange(min=0),
                 help="alpha: complete captions scored logprob / len**alpha (im2txt: 0)."))
loop_options = _options(  # the training loop: --steps, --epochs, --batch-size, --clip-gradients, --eval-every
    click.option("--steps", type=click.IntRange(min=1), default=None,
                 help="Run length in optimizer steps (wins over --epochs)."),
    click.option("--epochs", type=FiniteRange(min=0, min_open=True), default=None,
                 help="Run length in epochs (one epoch = every training (image, caption) pair once)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                 help="Global batch size (pairs)."),
    click.option("--clip-gradients", type=FiniteRange(min=0), default=5.0, show_default=True,
                 help="Global-norm gradient clip (0: off)."),
    click.option("--eval-every", type=click.IntRange(min=0), default=1000, show_default=True,
                 help="Validation perplexity every N steps, at each epoch end and at the end (0: only "
                      "there)."),
    click.option("--max-caption-length", type=click.IntRange(min=1), default=100, show_default=True,
                 help="Skip (and count) training captions of more tokens (COCO's longest: 57)."))
_CAPTION_FILES = "Caption file (repeatable): COCO json, Karpathy dataset_*.json or Flickr8k token file."
_TRAIN_SPLIT = "Split scheme: train on its train part, validate on its val part."


# ---- commands -------------------------------------------------------------------------------------------


@main.command("import-im2txt")
@click.option("--checkpoint", required=True,
              help="im2txt checkpoint: the prefix PATH/model.ckpt-N (or its .index file, or a train dir).")
@click.option("--vocab", required=True, help="The word_counts.txt the checkpoint was trained with.")
@click.option("--out", required=True, help="Model dir to write (config.json, weights, word_counts.txt).")
@click.option("--cnn-weights", default=None,
              help="Only for a checkpoint without InceptionV3/ variables: imagenet, none, a Keras weights "
                   "file or slim:PATH/inception_v3.ckpt.")
@click.option("--image-size", default=299, show_default=True, type=IMAGE_SIZES,
              help="CNN input size recorded in the model dir (im2txt: 299).")
def import_im2txt_command(checkpoint, vocab, out, cnn_weights, image_size):
    """Convert an im2txt (TF1) checkpoint and its word_counts.txt into a showtell model dir.

    The decoder (all im2txt LSTM naming variants) and the checkpoint's TF-slim InceptionV3 (written as
    cnn.weights.h5) are converted; `caption` and `evaluate` then use the model dir as usual.
    """
    from decoder.im2txt_import import import_im2txt

    report = import_im2txt(checkpoint, vocab, out, cnn_weights=cnn_weights, image_size=image_size)
    click.echo(f"{report.summary()} -> {out}")


@main.command("extract")
@click.argument("paths", nargs=-1)
@click.option("--out", required=True, help="Feature store to write (HDF5, e.g. features.h5); rerun resumes.")
@click.option("--images", multiple=True,
              help="Images root (repeatable, looked up in turn; e.g. COCO with train2014/ val2014/).")
@caption_options(False, "Caption file (repeatable): rows = every annotated image of all splits.",
                 "Split scheme of the caption files (every split is extracted).")
@click.option("--cnn-weights", default="imagenet", show_default=True,
              help="imagenet (Keras download), none (seeded random, tests), a .weights.h5 file or slim:CKPT.")
@click.option("--image-size", default=299, show_default=True, type=IMAGE_SIZES,
              help="CNN input size S (>= 75); images are resized to round(S*346/299) and centre-cropped.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per CNN call and commit (a resumed run must use the same).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored feature dtype.")
@click.option("--views", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Views per image: 1 central crop + V-1 distorted training views (crop, flip, colour).")
@click.option("--shard", default=0, show_default=True, type=click.IntRange(min=0),
              help="This shard K (0-based, < --num-shards).")
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(min=1),
              help="Split the images into N deterministic shards (row i -> shard i % N); see merge-features.")
@click.option("--seed", default=0, show_default=True, type=SEEDS,
              help="Seed of the random CNN (--cnn-weights none) and of the distorted views.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def extract_command(paths, out, images, captions, caption_format, split_scheme, cnn_weights, image_size,
                    batch_size, dtype, views, shard, num_shards, seed, no_progress):
    """Extract frozen InceptionV3 features for every image into an HDF5 feature store.

    Give image PATHS (files, folders, globs), or --images DIR with --captions FILE. Broken images are
    kept as rows with ok=False and the reason in /errors. Rerunning the same command resumes.
    """
    from extract.run import ExtractConfig, run_extract

    cfg = ExtractConfig(out=out, paths=list(paths), images=list(images), captions=list(captions),
                        caption_format=caption_format, split_scheme=split_scheme, cnn_weights=cnn_weights,
                        image_size=image_size, batch_size=batch_size, dtype=dtype, views=views, shard=shard,
                        num_shards=num_shards, seed=seed, progress=not no_progress)
    click.echo(run_extract(cfg, log=lambda m: click.echo(m, err=True)).summary())


def _shard_in_range(params: dict) -> None:
    if params["shard"] >= params["num_shards"]:
        raise click.BadParameter(f"{params['shard']} is not below --num-shards {params['num_shards']} "
                                 f"(shards are 0..{params['num_shards'] - 1}).", param_hint="'--shard'")


_PRECHECKS["extract"] = (_shard_in_range,)


@main.command("merge-features")
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged feature store to write.")
def merge_features_command(shards, out):
    """Merge the shard stores of `extract --shard K --num-shards N` into one store (refuses mismatches)."""
    from extract.merge import merge_shards

    click.echo(merge_shards(list(shards), out))


@main.command("train-decoder")
@click.option("--features", required=True, help="Feature store written by extract (features.h5).")
@caption_options(True, _CAPTION_FILES, _TRAIN_SPLIT)
@click.option("--model-dir", required=True, help="Output model dir; rerunning the same command resumes.")
@loop_options
@click.option("--embedding-size", type=click.IntRange(1, 8192), default=512, show_default=True,
              help="Width of the image and word embeddings.")
@click.option("--lstm-units", type=click.IntRange(1, 8192), default=512, show_default=True,
              help="LSTM state size.")
@click.option("--feature-norm", type=click.Choice(["none", "standardize"]), default="none", show_default=True,
              help="standardize: (f - mean) / std per dimension from the training features (for "
                   "--cnn-weights none stores); none: im2txt's raw features.")
@click.option("--vocab", default=None, help="Use this word_counts.txt instead of building one.")
@click.option("--min-word-count", type=click.IntRange(min=1), default=4, show_default=True,
              help="Building the vocabulary: words seen fewer times in training captions become <UNK>.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="sgd: im2txt's recipe (lr 2.0, x0.5 every 8 epochs); adam: Keras defaults (lr 0.001).")
@click.option("--learning-rate", type=FiniteRange(min=0, min_open=True), default=None,
              help="Initial learning rate (default: per optimizer).")
@click.option("--seed", type=SEEDS, default=0, show_default=True,
              help="Seed of init, shuffles, views and dropout (deterministic on CPU).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Checkpoint every N steps (keeps the last 5, plus the best by validation); 0: only at "
                   "evaluations and at the end.")
@click.option("--max-val-pairs", type=click.IntRange(min=1), default=None,
              help="Validate on at most this many pairs (default: all).")
@click.option("--precision", type=click.Choice(["float32", "mixed_float16", "mixed_bfloat16"]),
              default="float32", show_default=True, help="mixed_float16 speeds up GPUs (dynamic loss scale).")
@click.option("--in-memory", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Hold the features in RAM (auto: when they fit) or stream them from the file.")
@click.option("--overwrite", is_flag=True,
              help="Start afresh in a model dir that holds another configuration.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_decoder_command(features, captions, caption_format, split_scheme, model_dir, steps, epochs,
                          batch_size, embedding_size, lstm_units, feature_norm, vocab, min_word_count,
                          optimizer, learning_rate, clip_gradients, seed, eval_every, max_caption_length,
                          checkpoint_every, max_val_pairs, precision, in_memory, overwrite, no_progress):
    """Train the Show and Tell decoder (projection, embeddings, LSTM, logits) from cached features.

    Recipe: im2txt phase 1 (SGD 2.0, clip 5.0, x0.5 every 8 epochs, batch 32). Uses every local GPU
    (MirroredStrategy) or the machines of TF_CONFIG (MultiWorkerMirroredStrategy).
    """
    from data.pipeline import PipelineConfig
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    data = DataConfig(features=features, captions=list(captions), caption_format=caption_format,
                      split_scheme=split_scheme, vocab=vocab,
                      min_word_count=min_word_count, max_caption_length=max_caption_length)
    train = TrainConfig(batch_size=batch_size, optimizer=optimizer, learning_rate=learning_rate,
                        clip_gradients=clip_gradients, epochs=epochs, steps=steps, seed=seed,
                        eval_every=eval_every, checkpoint_every=checkpoint_every, max_val_pairs=max_val_pairs,
                        precision=precision)
    result = train_decoder(data, model_dir, train, embedding_size=embedding_size, lstm_units=lstm_units,
                           feature_norm=feature_norm,
                           pipeline=PipelineConfig(in_memory=in_memory), overwrite=overwrite,
                           progress=not no_progress, log=lambda m: click.echo(m, err=True))
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val perplexity {result.val_perplexity:.3f} "
               f"(best {result.best_val_perplexity:.3f}) -> {model_dir}")


@main.command("caption")
@click.argument("paths", nargs=-1)
@click.option("--model-dir", required=True,
              help="Trained model dir (train-decoder, finetune or import-im2txt).")
@click.option("--features", default=None, help="Caption rows of this feature store instead of image PATHS.")
@click.option("--keys", multiple=True, help="With --features: only these store keys (repeatable).")
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1),
              help="Captions printed per image.")
@click.option("--json", "json_out", default=None,
              help="Write COCO results JSON [{image_id, caption, file_name}] with each image's best caption "
                   "(image_id -1: unknown, the image is named by file_name).")
@search_options
@click.option("--no-repeat-ngram", default=0, show_default=True, type=click.IntRange(min=0),
              help="Never repeat an n-gram of this size within a caption (0 = off).")
@click.option("--suppress-unk", is_flag=True, help="Never emit <UNK>.")
@click.option("--sample", is_flag=True, help="Sample captions instead of beam search.")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(1, MAX_BEAM),
              help="--sample: captions per image.")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteRange(min=0, min_open=True),
              help="--sample: softmax temperature (<1 sharper, >1 more varied).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="--sample: draw only among the k most likely words (0 = all).")
@click.option("--seed", default=0, show_default=True, type=SEEDS, help="--sample: random seed.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per CNN and search batch.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def caption_command(paths, model_dir, features, keys, top, json_out, beam_size, max_length,
                    length_normalization, no_repeat_ngram, suppress_unk, sample, num_samples, temperature,
                    top_k, seed, batch_size, no_progress):
    """Caption images (PATHS: files, folders, globs) or cached features (--features) with a model dir.

    Prints each image's top captions with p = exp(logprob), like im2txt's run_inference. Bad images are
    reported and skipped; the exit status is 1 only when no image could be captioned.
    """
    import math

    from beam import SearchConfig
    from decoder.infer.captioner import Captioner, caption_files, caption_store
    from evaluation.metrics import write_results_json
    from extract.inputs import check_output

    if json_out:
        check_output(json_out)
    search = SearchConfig(beam_size=beam_size, max_length=max_length,
                          length_normalization=length_normalization, no_repeat_ngram=no_repeat_ngram,
                          suppress_unk=suppress_unk, sample=sample, num_samples=num_samples,
                          temperature=temperature, top_k=top_k, seed=seed)
    captioner = Captioner(model_dir, search)
    progress = not no_progress
    if features:
        run = caption_store(captioner, features, keys, batch_size=batch_size, progress=progress)
    else:
        run = caption_files(captioner, paths, batch_size=batch_size, progress=progress)
    for item in run.results:
        if item.error:
            click.echo(f"Skipped {item.key}: {item.error}", err=True)
            continue
        click.echo(f"Captions for image {item.key}:")
        for i, (cap, text) in enumerate(zip(item.captions[:top], item.texts[:top], strict=True)):
            click.echo(f"  {i}) {text} (p={math.exp(cap.logprob):f})")
    if json_out:
        write_results_json(json_out, run.coco_results())
    click.echo(run.summary() + (f" -> {json_out}" if json_out else ""))
    if run.n_ok == 0:
        raise SystemExit(1)


def _caption_inputs(params: dict) -> None:
    if bool(params["paths"]) == bool(params["features"]):
        raise InputError("give either image PATHS or --features FILE.h5 (one of them).")
    if params["keys"] and not params["features"]:
        raise InputError("--keys selects rows of a feature store: it needs --features.")


_PRECHECKS["caption"] = (_caption_inputs,)


@main.command("export")
@click.option("--model-dir", required=True,
              help="Trained model dir (train-decoder, finetune or import-im2txt) with a CNN record.")
@click.option("--out", required=True,
              help="SavedModel folder to write, e.g. exported/showtell/1 (TF Serving's version folder).")
@search_options
@click.option("--top", default=3, show_default=True, type=click.IntRange(1, MAX_BEAM),
              help="Captions returned per image (at most --beam-size).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def export_command(model_dir, out, beam_size, max_length, length_normalization, top, overwrite):
    """Export a model dir as a self-contained SavedModel: image bytes -> captions, for TF Serving.

    Signatures: serving_default(images string [N]) and caption_features(features float32 [N, 2048]), both
    -> captions string [N, top], log_probs float32 [N, top], ok bool [N]. Decoding, preprocessing, the CNN,
    the decoder and the beam search all run inside the graph; loading it needs TensorFlow only.
    """
    from decoder.infer.export import ExportConfig, export_model

    config = ExportConfig(beam_size=beam_size, max_length=max_length,
                          length_normalization=length_normalization, top=top)
    report = export_model(model_dir, out, config, overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    click.echo(report.summary())


def _top_within_beam(params):
    if params["top"] > params["beam_size"]:
        raise click.BadParameter(f"--top {params['top']} is more than --beam-size {params['beam_size']}: the "
                                 "search returns at most beam-size captions per image.", param_hint="'--top'")


_PRECHECKS["export"] = (_top_within_beam,)


@main.command("finetune")
@click.option("--model-dir", required=True,
              help="Trained model dir (train-decoder, import-im2txt or finetune): the starting point.")
@click.option("--images", required=True, multiple=True,
              help="Images root (repeatable, looked up in turn) holding the caption file's image paths.")
@caption_options(True, _CAPTION_FILES, _TRAIN_SPLIT)
@click.option("--out", required=True,
              help="NEW model dir to write (cnn.weights.h5 + decoder); rerunning the same command resumes.")
@loop_options
@click.option("--trainable-blocks", type=click.IntRange(0, 11), default=None,
              help="Train only the top N of InceptionV3's 11 mixed blocks (mixed10 down; 0 = CNN frozen). "
                   "Default: the whole CNN.")
@click.option("--image-size", type=IMAGE_SIZES, default=None,
              help="CNN input size (>= 75). Default: the model dir's CNN image size; smaller for a CPU.")
@click.option("--learning-rate", type=FiniteRange(min=0, min_open=True), default=0.0005, show_default=True,
              help="Constant SGD learning rate (im2txt phase 2).")
@click.option("--seed", type=SEEDS, default=0, show_default=True,
              help="Seed of shuffles, image distortions and dropout.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Checkpoint every N steps (keeps the last 3, ~90 MB each, plus the best by validation); "
                   "0: only at evaluations and at the end.")
@click.option("--max-val-pairs", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Validate on at most this many (image, caption) pairs (0: all).")
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
              default="auto", show_default=True, help="auto: mixed_float16 on a GPU, float32 on a CPU.")
@click.option("--decode-threads", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Threads decoding image files for each batch.")
@click.option("--overwrite", is_flag=True,
              help="Start afresh in an --out dir that holds another run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def finetune_command(model_dir, images, captions, caption_format, split_scheme, out, steps, epochs,
                     batch_size, trainable_blocks, image_size, learning_rate, clip_gradients, seed,
                     eval_every, max_caption_length, checkpoint_every, max_val_pairs, precision,
                     decode_threads, overwrite, no_progress):
    """Fine-tune the CNN and the decoder of a trained model dir end-to-end on images (im2txt phase 2).

    Recipe: SGD lr 0.0005 constant, clip 5.0, batch 32; training distortions (random crop, flip, colour
    jitter); batch norm in inference mode (moving statistics frozen). Writes a NEW model dir with
    cnn.weights.h5 and its fingerprint: `caption` uses it, `extract --cnn-weights OUT/cnn.weights.h5`
    re-extracts features with it. Same training loop as train-decoder (checkpoints, resume, GPUs).
    """
    from decoder.train.finetune import FinetuneConfig, finetune, phase2_recipe

    cfg = FinetuneConfig(model_dir=model_dir, images=list(images), captions=list(captions),
                         caption_format=caption_format, split_scheme=split_scheme,
                         trainable_blocks=trainable_blocks, image_size=image_size,
                         decode_threads=decode_threads, max_caption_length=max_caption_length)
    train = phase2_recipe(batch_size=batch_size, learning_rate=learning_rate, clip_gradients=clip_gradients,
                          epochs=epochs, steps=steps, seed=seed, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, max_val_pairs=max_val_pairs,
                          precision=precision)
    result = finetune(cfg, out, train, overwrite=overwrite, progress=not no_progress,
                      log=lambda m: click.echo(m, err=True))
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val perplexity {result.val_perplexity:.3f} "
               f"(best {result.best_val_perplexity:.3f}) -> {out}")


@main.command("train-scst")
@click.option("--model-dir", required=True,
              help="XE-trained model dir (train-decoder, finetune or import-im2txt): the starting point.")
@click.option("--features", required=True,
              help="Feature store of the model's CNN (extract): the training and validation images.")
@caption_options(True, "Caption file (repeatable) holding the splits and ALL their reference captions.",
                 _TRAIN_SPLIT)
@click.option("--out", required=True, help="NEW model dir to write; rerunning the same command resumes.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Run length in optimizer steps (wins over --epochs).")
@click.option("--epochs", type=FiniteRange(min=0, min_open=True), default=None,
              help="Run length in epochs (one epoch = every training image once).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Global batch size in images (each sampled --samples times).")
@click.option("--samples", type=click.IntRange(1, 64), default=5, show_default=True,
              help="Captions sampled per training image (temperature 1; 1..64).")
@click.option("--baseline", type=click.Choice(["mean", "greedy"]), default="mean", show_default=True,
              help="mean: each sample's baseline is the mean reward of the image's other samples (needs "
                   "--samples >= 2); greedy: the reward of the greedy caption (Rennie et al. 2017).")
@click.option("--max-length", type=click.IntRange(2, 1000), default=16, show_default=True,
              help="Most tokens per sampled caption, counting <S> and </S> (>= 2).")
@click.option("--cider-df", type=click.Choice(["train", "corpus"]), default="train", show_default=True,
              help="CIDEr-D document frequencies: of all training references, or of each batch's images.")
@click.option("--learning-rate", type=FiniteRange(min=0, min_open=True), default=5e-5, show_default=True,
              help="Constant Adam learning rate.")
@click.option("--clip-gradients", type=FiniteRange(min=0), default=5.0, show_default=True,
              help="Global-norm gradient clip (0: off).")
@click.option("--eval-every", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Validation CIDEr-D (greedy captions) every N steps (and at each epoch end).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Checkpoint every N steps (keeps the last 5, plus the best by validation CIDEr-D).")
@click.option("--max-val-images", type=click.IntRange(min=1), default=None,
              help="Validate on at most this many validation images (default: all).")
@click.option("--seed", type=SEEDS, default=0, show_default=True,
              help="Seed of the shuffles and the sampled captions (a resumed run draws the same).")
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
              default="auto", show_default=True, help="auto: mixed_float16 on a GPU, float32 on a CPU.")
@click.option("--in-memory", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Hold the features in RAM (auto: when they fit) or stream them from the file.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an --out dir that holds another run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_scst_command(model_dir, features, captions, caption_format, split_scheme, out, steps, epochs,
                       batch_size, samples, baseline, max_length, cider_df, learning_rate, clip_gradients,
                       eval_every, checkpoint_every, max_val_images, seed, precision, in_memory, overwrite,
                       no_progress):
    """Self-critical training (SCST) of a trained decoder on CIDEr-D, from the feature cache.

    Per training image: --samples captions sampled from the model, reward = CIDEr-D against the image's
    references, loss = -(reward - baseline) * log p(caption) averaged over words; Adam lr 5e-5. Writes a
    NEW model dir (caption, evaluate and export use it as any other); validation = CIDEr-D of greedy
    captions of the val split. Same training loop as train-decoder (checkpoints, resume, GPUs).
    """
    from decoder.train.scst import ScstConfig, scst_recipe, train_scst

    cfg = ScstConfig(model_dir=model_dir, features=features, captions=list(captions),
                     caption_format=caption_format, split_scheme=split_scheme, samples=samples,
                     baseline=baseline, max_length=max_length, cider_df=cider_df, in_memory=in_memory)
    train = scst_recipe(batch_size=batch_size, learning_rate=learning_rate, clip_gradients=clip_gradients,
                        epochs=epochs, steps=steps, seed=seed, eval_every=eval_every,
                        checkpoint_every=checkpoint_every, max_val_pairs=max_val_images, precision=precision)
    result = train_scst(cfg, out, train, overwrite=overwrite, progress=not no_progress,
                        log=lambda m: click.echo(m, err=True))
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val CIDEr-D (greedy) "
               f"{result.val_metrics.get('val_cider', float('nan')):.3f} (best {-result.best_score:.3f}) "
               f"-> {out}")


def _scst_samples(params: dict) -> None:
    if params["baseline"] == "mean" and params["samples"] < 2:
        raise click.BadParameter(f"{params['samples']} is too few for --baseline mean, which compares each "
                                 "sample with the image's other samples: give 2 or more.",
                                 param_hint="'--samples'")


_PRECHECKS["train-scst"] = (_scst_samples,)


@main.command("evaluate")
@click.option("--model-dir", required=True,
              help="Trained model dir (train-decoder, finetune or import-im2txt).")
@click.option("--features", default=None,
              help="Feature store of the split's images (same CNN as the model dir); or give --images.")
@click.option("--images", multiple=True,
              help="Images root (repeatable): without --features the CNN runs on the split's images; with "
                   "--features only the report's thumbnails come from here.")
@caption_options(True, "Caption file(s) holding the split and ALL its reference captions (repeatable).",
                 "Split scheme (none: every image).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="The split to evaluate.")
@click.option("--out-dir", default=None,
              help="Folder of results.json and metrics.json [MODEL_DIR/eval-SPLIT].")
@click.option("--results", default=None,
              help="COCO results JSON [{image_id, caption}] [OUT_DIR/results.json].")
@click.option("--metrics", default=None,
              help="Metrics JSON (corpus + per-image scores) [OUT_DIR/metrics.json].")
@click.option("--report", default=None,
              help="Also write this self-contained HTML page: every image, worst CIDEr first.")
@search_options
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per CNN and search batch.")
@click.option("--max-images", default=None, type=click.IntRange(min=1),
              help="Evaluate only the first N images of the split.")
@click.option("--java", "java", default="auto", show_default=True, type=click.Choice(["auto", "yes", "no"]),
              help="PTB tokenizer + METEOR need java: auto (when on the PATH), yes (require it), no (never).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def evaluate_command(model_dir, features, images, captions, caption_format, split_scheme, split, out_dir,
                     results, metrics, report, beam_size, max_length, length_normalization, batch_size,
                     max_images, java, no_progress):
    """Score a model dir on one split: perplexity, beam-search captions, BLEU-1..4/METEOR/ROUGE-L/CIDEr.

    Captions are scored against ALL reference captions of each image with pycocoevalcap's scorers. Prints
    the table; writes the COCO results JSON, the metrics JSON and (--report) an HTML error-analysis page.
    """
    from beam import SearchConfig
    from decoder.infer.evaluate import EvalConfig, run_evaluate

    cfg = EvalConfig(model_dir=model_dir, captions=list(captions), features=features, images=list(images),
                     caption_format=caption_format, split_scheme=split_scheme, split=split, out_dir=out_dir,
                     results=results, metrics=metrics, report=report, batch_size=batch_size,
                     max_images=max_images, use_java={"auto": "auto", "yes": True, "no": False}[java],
                     progress=not no_progress)
    search = SearchConfig(beam_size=beam_size, max_length=max_length,
                          length_normalization=length_normalization)
    result = run_evaluate(cfg, search, log=lambda m: click.echo(m, err=True))
    click.echo(result.table)
    click.echo(result.summary())


@main.command("demo")
@click.option("--workdir", default="demo_run", show_default=True,
              help="Folder for the generated data, features, model and reports; rerunning resumes.")
@click.option("--preset", default="full", show_default=True, type=click.Choice(["full", "tiny"]),
              help="full: the real demo (~2-3 min on 2 CPU cores); tiny: fewer images and steps (~1 min).")
@click.option("--fresh", is_flag=True,
              help="Remove what an earlier demo wrote in the workdir and start over.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def demo_command(workdir, preset, fresh, no_progress):
    """Run the whole pipeline on generated coloured shapes: extract -> train-decoder -> caption -> evaluate.

    Prints each step's equivalent command line (copy them for real data) and ends with captions of
    held-out test images next to their references, and BLEU-4/CIDEr on the test split. Uses a random CNN
    (--cnn-weights none): real captions need ImageNet weights and COCO.
    """
    from decoder.demo import DemoConfig, run_demo

    run_demo(workdir, DemoConfig.preset(preset), fresh=fresh, progress=not no_progress, echo=click.echo,
             log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    main()
