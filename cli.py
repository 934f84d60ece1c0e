"""showtell command line: `python cli.py --help`.

Each command parses its options, calls one package function and prints. Nothing else reads argv or the
environment. A bad argument raises `base.errors.InputError`, printed as one sentence with exit status 2.
"""

import os
from functools import partial

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

# base.cli_support: exit codes, prechecks, quiet TensorFlow start; cli._config / cli._fields: used by tests
from base.cli_support import FiniteRange, Group, log, run_precision, stack  # noqa: E402
from base.cli_support import config as _config  # noqa: E402
from base.cli_support import fields as _fields  # noqa: E402
from base.devices import PRECISION_CHOICES  # noqa: E402  (imports no TensorFlow itself)
from base.errors import InputError  # noqa: E402
from data.formats import FORMATS  # noqa: E402  (standard library only: --help stays fast)
from data.splits import SPLIT_SCHEMES  # noqa: E402

__version__ = "0.1.0"
RESUMABLE = ("extract", "train-decoder", "finetune", "train-scst", "demo")  # Ctrl-C: "rerun to resume"


@click.group(cls=Group, resumable=RESUMABLE,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="showtell")
def main():
    """showtell: train a Show and Tell (im2txt) image captioner from cached InceptionV3 features.

    Pipeline: extract -> train-decoder -> (finetune, train-scst) -> caption / evaluate / export. `demo`
    runs it all on a generated sample in a few minutes on a CPU.
    """


# ---- options shared by several commands ------------------------------------------------------------------
IMAGE_SIZES = click.IntRange(75, 2048)  # InceptionV3 needs >= 75 px; im2txt uses 299
MAX_BEAM = 64  # each step scores beam x beam x vocabulary candidates per image: beam 100000 took 33 s and
# 2.5 GB for one image; im2txt uses 3 and captions stop improving beyond ~10, so 64 leaves ample room


def caption_options(required: bool, captions_help: str, scheme_help: str):
    """--captions (repeatable), --format and --split-scheme (see docs/captions.md)."""
    return stack(
        click.option("--captions", required=required, multiple=True, help=captions_help),
        click.option("--format", "caption_format", default="auto", type=click.Choice(("auto", *FORMATS)),
                     help="Caption file format (auto: from the content)."),
        click.option("--split-scheme", default="auto", type=click.Choice(SPLIT_SCHEMES),
                     help=scheme_help))


search_options = stack(  # beam search as im2txt: --beam-size, --max-length, --length-normalization
    click.option("--beam-size", default=3, type=click.IntRange(1, MAX_BEAM),
                 help=f"Beam size (1 = greedy; im2txt: 3; at most {MAX_BEAM}: the work per image grows with "
                      "its square)."),
    click.option("--max-length", default=20, type=click.IntRange(2, 1000),
                 help="Most tokens per caption, counting <S> and </S> (im2txt: 20; >= 2)."),
    click.option("--length-normalization", default=0.0, type=FiniteRange(min=0),
                 help="alpha: complete captions scored logprob / len**alpha (im2txt: 0)."))


def loop_options(unit: str, batch: str, metric: str, keep: str):
    """The training loop's options (decoder.train.loop, shared by train-decoder, finetune and train-scst):
    --steps, --epochs, --batch-size, --clip-gradients, --eval-every, --checkpoint-every. The help names
    what the command counts: an epoch is every training `unit` once, the batch size counts `batch`, the
    validation computes `metric`, the checkpoints kept are `keep`."""
    return stack(
        click.option("--steps", type=click.IntRange(min=1),
                     help="Run length in optimizer steps (wins over --epochs)."),
        click.option("--epochs", type=FiniteRange(min=0, min_open=True),
                     help=f"Run length in epochs (one epoch = every training {unit} once)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32,
                     help=f"Global batch size {batch}."),
        click.option("--clip-gradients", type=FiniteRange(min=0), default=5.0,
                     help="Global-norm gradient clip (0: off)."),
        click.option("--eval-every", type=click.IntRange(min=0), default=1000,
                     help=f"{metric} every N steps, at each epoch end and at the end (0: only there)."),
        click.option("--checkpoint-every", type=click.IntRange(min=0), default=500,
                     help=f"Checkpoint every N steps (keeps {keep}); 0: only at evaluations and at the end."))


# single options used by several commands, each declared once; a command gives what differs (help, default)
learning_rate_option = partial(click.option, "--learning-rate", type=FiniteRange(min=0, min_open=True))
seed_option = partial(click.option, "--seed", type=click.IntRange(0, 2**32 - 1), default=0)  # help: what it
# seeds there; the range of numpy's and keras.utils.set_random_seed's seeds
overwrite_option = partial(click.option, "--overwrite", is_flag=True)  # help: what it may replace
precision_option = partial(click.option, "--precision", type=click.Choice(PRECISION_CHOICES), default="auto",
                           help="Compute precision. auto: what this machine runs natively for this command "
                                "(bfloat16 on Ampere+ GPUs and AMX CPUs, float16 on older GPUs; "
                                "docs/precision.md).")  # base.devices.auto_precision
no_progress_option = click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
caption_length_option = click.option(  # captions a training command skips (decoder.train: *_pairs)
    "--max-caption-length", type=click.IntRange(min=1), default=100,
    help="Skip (and count) training captions of more tokens (COCO's longest: 57).")
in_memory_option = click.option(
    "--in-memory", type=click.Choice(["auto", "yes", "no"]), default="auto",
    help="Hold the features in RAM (auto: when they fit) or stream them from the file.")
weights_option = partial(  # decoder.modeldir.load_model_dir; help: what the weights are used for
    click.option, "--weights", type=click.Choice(["last", "best"]), default="last")
_WEIGHTS = ("The model dir's weights {}: last (decoder.weights.h5, the run's final step) or best "
            "(checkpoints/best.npz, its best validation score); the step and score used are printed.")
_TRAINED = "Trained model dir (train-decoder, finetune or import-im2txt)"
_CAPTION_FILES = "Caption file (repeatable): COCO json, Karpathy dataset_*.json or Flickr8k token file."
_TRAIN_SPLIT = "Split scheme: train on its train part, validate on its val part."
_RERUN = "Start afresh in an --out dir that holds another run."


# ---- commands -------------------------------------------------------------------------------------------


@main.command("import-im2txt")
@click.option("--checkpoint", required=True,
              help="im2txt checkpoint: the prefix PATH/model.ckpt-N (or its .index file, or a train dir).")
@click.option("--vocab", required=True, help="The word_counts.txt the checkpoint was trained with.")
@click.option("--out", required=True, help="Model dir to write (config.json, weights, word_counts.txt).")
@click.option("--cnn-weights",
              help="Only for a checkpoint without InceptionV3/ variables: imagenet, none, a Keras weights "
                   "file or slim:PATH/inception_v3.ckpt.")
@click.option("--image-size", default=299, type=IMAGE_SIZES,
              help="CNN input size recorded in the model dir (im2txt: 299).")
def import_im2txt_command(checkpoint, vocab, out, cnn_weights, image_size):
    """Convert an im2txt (TF1) checkpoint and its word_counts.txt into a showtell model dir.

    The decoder (all im2txt LSTM naming variants) and the checkpoint's TF-slim InceptionV3 (written as
    cnn.weights.h5) are converted; `caption` and `evaluate` then use the model dir as usual.
    """
    from decoder.im2txt_import import import_im2txt

    report = import_im2txt(checkpoint, vocab, out, cnn_weights=cnn_weights, image_size=image_size)
    click.echo(f"{report.summary()} -> {out}")


def _shard_in_range(params: dict) -> None:
    if params["shard"] >= params["num_shards"]:
        raise click.BadParameter(f"{params['shard']} is not below --num-shards {params['num_shards']} "
                                 f"(shards are 0..{params['num_shards'] - 1}).", param_hint="'--shard'")


def _parquet_columns_valid(params: dict) -> None:
    from data.shard_readers import ShardColumns  # standard library only: checked before TensorFlow

    try:
        ShardColumns.parse(params["parquet_columns"])
    except InputError as err:
        raise click.BadParameter(str(err).removeprefix("--parquet-columns "),
                                 param_hint="'--parquet-columns'") from None


@main.command("extract", prechecks=(_shard_in_range, _parquet_columns_valid), own_precision=True)
@click.argument("paths", nargs=-1)
@click.option("--out", required=True, help="Feature store to write (HDF5, e.g. features.h5); rerun resumes.")
@click.option("--images", multiple=True,
              help="Images root (repeatable, looked up in turn; e.g. COCO with train2014/ val2014/).")
@caption_options(False, "Caption file (repeatable): rows = every annotated image of all splits.",
                 "Split scheme of the caption files (every split is extracted).")
@click.option("--cnn-weights", default="imagenet",
              help="imagenet (Keras download), none (seeded random, tests), a .weights.h5 file or slim:CKPT.")
@click.option("--image-size", default=299, type=IMAGE_SIZES,
              help="CNN input size S (>= 75); images are resized to round(S*346/299) and centre-cropped.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1),
              help="Images per CNN call and commit (a resumed run must use the same).")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]),
              help="Stored feature dtype.")
@click.option("--views", default=1, type=click.IntRange(1, 64),
              help="Views per image: 1 central crop + V-1 distorted training views (crop, flip, colour).")
@click.option("--grid", is_flag=True,
              help="Also store the Mixed_7c grid [h, w, 2048] per image (8x8 at 299 px) for --arch attend.")
@click.option("--shard", default=0, type=click.IntRange(min=0),
              help="This shard K (0-based, < --num-shards).")
@click.option("--num-shards", default=1, type=click.IntRange(min=1),
              help="Split the images into N deterministic shards (row i -> shard i % N); see merge-features.")
@click.option("--parquet-columns", default="", show_default="image=jpg,caption=txt,key=key",
              help="Parquet shards: the image/caption/key column names (img2dataset's by default).")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this machine; ray: shards on a Ray cluster (pip install 'showtell[ray]').")
@click.option("--address", default="",
              help="--engine ray: address of a running Ray cluster (default: a local Ray for the command).")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="--engine ray: CNN actors (0: one per GPU of the cluster, else half its CPUs).")
@seed_option(help="Seed of the random CNN (--cnn-weights none) and of the distorted views.")
@precision_option()
@no_progress_option
def extract_command(**params):
    """Extract frozen InceptionV3 features for every image into an HDF5 feature store.

    Give image PATHS (files, folders, globs), or --images DIR with --captions FILE, or img2dataset shards
    (webdataset 'shards/{00000..00099}.tar' or '*.parquet', read in place). Broken images are kept as
    rows with ok=False and the reason in /errors. Rerunning the same command resumes.
    """
    from extract.run import ExtractConfig, run_extract

    cfg = _config(ExtractConfig, params, progress=not params["no_progress"])
    if cfg.engine == "ray":
        from extract.ray_engine import run_extract_ray

        run_extract = run_extract_ray
    click.echo(run_extract(cfg, log=log).summary())


@main.command("merge-features")  # TensorFlow only through extract.preprocess, started quietly
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged feature store to write (a new file).")
@overwrite_option(help="Replace an --out that holds a feature store (nothing else).")
def merge_features_command(shards, out, overwrite):
    """Merge the shard stores of `extract --shard K --num-shards N` into one store (refuses mismatches)."""
    from extract.merge import merge_shards

    click.echo(merge_shards(list(shards), out, overwrite=overwrite))


@main.command("train-decoder")
@click.option("--features", required=True, help="Feature store written by extract (features.h5).")
@caption_options(True, _CAPTION_FILES, _TRAIN_SPLIT)
@click.option("--model-dir", required=True, help="Output model dir; rerunning the same command resumes.")
@loop_options("(image, caption) pair", "(pairs)", "Validation perplexity",
              "the last 5, plus the best by validation")
@caption_length_option
@click.option("--embedding-size", type=click.IntRange(1, 8192), default=512,
              help="Width of the image and word embeddings.")
@click.option("--lstm-units", type=click.IntRange(1, 8192), default=512, help="LSTM state size.")
@click.option("--feature-norm", type=click.Choice(["none", "standardize"]), default="none",
              help="standardize: (f - mean) / std per dimension from the training features (for "
                   "--cnn-weights none stores); none: im2txt's raw features.")
@click.option("--arch", type=click.Choice(["show-and-tell", "attend"]), default="show-and-tell",
              help="show-and-tell: im2txt over the pooled feature; attend: soft attention over the grid "
                   "(a store from extract --grid; docs/attention.md).")
@click.option("--attention-units", type=click.IntRange(1, 8192), default=512,
              help="--arch attend: width of the attention MLP.")
@click.option("--attention-penalty", type=FiniteRange(min=0), default=1.0,
              help="--arch attend: lambda of the doubly stochastic penalty sum_i (1 - sum_t alpha_ti)^2.")
@click.option("--attention-init", type=click.Choice(["zero", "mean"]), default="zero",
              help="--arch attend: the LSTM's initial state: zero (Att2in; the image enters only through the "
                   "attention) or mean (the paper's: from the mean grid cell).")
@click.option("--attention-temperature", type=FiniteRange(min=0, min_open=True), default=1.0,
              help="--arch attend: tau of the attention softmax(score / tau); below 1 sharpens it.")
@click.option("--vocab", help="Use this word_counts.txt instead of building one.")
@click.option("--min-word-count", type=click.IntRange(min=1), default=4,
              help="Building the vocabulary: words seen fewer times in training captions become <UNK>.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd",
              help="sgd: im2txt's recipe (lr 2.0, x0.5 every 8 epochs); adam: Keras defaults (lr 0.001).")
@learning_rate_option(help="Initial learning rate (default: per optimizer).")
@seed_option(help="Seed of init, shuffles, views and dropout (deterministic on CPU).")
@click.option("--max-val-pairs", type=click.IntRange(min=1),
              help="Validate on at most this many pairs (default: all).")
@precision_option()
@in_memory_option
@overwrite_option(help="Start afresh in a model dir that holds another configuration.")
@no_progress_option
def train_decoder_command(model_dir, embedding_size, lstm_units, feature_norm, overwrite, no_progress, arch,
                          **params):
    """Train the Show and Tell decoder (projection, embeddings, LSTM, logits) from cached features.

    Recipe: im2txt phase 1 (SGD 2.0, clip 5.0, x0.5 every 8 epochs, batch 32). Uses every local GPU
    (MirroredStrategy) or the machines of TF_CONFIG (MultiWorkerMirroredStrategy).
    """
    from data.pipeline import PipelineConfig
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    attention = {k: params.pop(k) for k in ("attention_units", "attention_penalty", "attention_init",
                                            "attention_temperature")}
    result = train_decoder(_config(DataConfig, params), model_dir, _config(TrainConfig, params),
                           embedding_size=embedding_size, lstm_units=lstm_units, feature_norm=feature_norm,
                           pipeline=_config(PipelineConfig, params), overwrite=overwrite,
                           progress=not no_progress, log=log, arch=arch, **attention)
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val perplexity {result.val_perplexity:.3f} "
               f"(best {result.best_val_perplexity:.3f}) -> {model_dir}")


def _caption_inputs(params: dict) -> None:
    if bool(params["paths"]) == bool(params["features"]):
        raise InputError("give either image PATHS or --features FILE.h5 (one of them).")
    if params["keys"] and not params["features"]:
        raise InputError("--keys selects rows of a feature store: it needs --features.")


@main.command("caption", prechecks=(_caption_inputs,), own_precision=True)
@click.argument("paths", nargs=-1)
@click.option("--model-dir", required=True, help=f"{_TRAINED}.")
@click.option("--features", help="Caption rows of this feature store instead of image PATHS.")
@click.option("--keys", multiple=True, help="With --features: only these store keys (repeatable).")
@click.option("--top", default=3, type=click.IntRange(min=1), help="Captions printed per image.")
@click.option("--json", "json_out",
              help="Write COCO results JSON [{image_id, caption, file_name}] with each image's best caption "
                   "(image_id -1: unknown, the image is named by file_name); attention models add "
                   "'attention': {grid, words, weights}.")
@click.option("--attention", "attention_dir",
              help="Attention model dirs: write one PNG per image into this folder, the image and each "
                   "word's attention weights over it (docs/attention.md).")
@click.option("--images", "images_roots", multiple=True,
              help="With --features and --attention: images roots where the store's keys are found (the "
                   "heat-maps' background; without it they show the weights alone).")
@search_options
@click.option("--no-repeat-ngram", default=0, type=click.IntRange(min=0),
              help="Never repeat an n-gram of this size within a caption (0 = off).")
@click.option("--suppress-unk", is_flag=True, help="Never emit <UNK>.")
@click.option("--sample", is_flag=True, help="Sample captions instead of beam search.")
@click.option("--num-samples", default=1, type=click.IntRange(1, MAX_BEAM),
              help="--sample: captions per image.")
@click.option("--temperature", default=1.0, type=FiniteRange(min=0, min_open=True),
              help="--sample: softmax temperature (<1 sharper, >1 more varied).")
@click.option("--top-k", default=0, type=click.IntRange(min=0),
              help="--sample: draw only among the k most likely words (0 = all).")
@seed_option(help="--sample: random seed.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), help="Images per CNN and search batch.")
@weights_option(help=_WEIGHTS.format("to caption with"))
@precision_option()
@no_progress_option
def caption_command(paths, model_dir, features, keys, top, json_out, batch_size, weights, no_progress,
                    attention_dir, images_roots, precision, **params):
    """Caption images (PATHS: files, folders, globs) or cached features (--features) with a model dir.

    Prints each image's top captions with p = exp(logprob), like im2txt's run_inference. Bad images are
    reported and skipped; the exit status is 1 only when no image could be captioned.
    """
    from beam import SearchConfig
    from decoder.infer.caption_run import run_caption
    from extract.inputs import check_output, check_output_dir

    if json_out:
        check_output(json_out)
    if attention_dir:
        check_output_dir(attention_dir, "--attention")
    run_precision(precision, "caption")
    run = run_caption(model_dir, _config(SearchConfig, params), weights, paths, features, keys,
                      batch_size=batch_size, top=top, json_out=json_out, attention_dir=attention_dir,
                      images_roots=images_roots, progress=not no_progress, echo=click.echo, log=log)
    if run.n_ok == 0:
        raise SystemExit(1)


def _top_within_beam(params):
    if params["top"] > params["beam_size"]:
        raise click.BadParameter(f"--top {params['top']} is more than --beam-size {params['beam_size']}: the "
                                 "search returns at most beam-size captions per image.", param_hint="'--top'")


@main.command("export", prechecks=(_top_within_beam,))
@click.option("--model-dir", required=True, help=f"{_TRAINED} with a CNN record.")
@click.option("--out", required=True,
              help="SavedModel folder to write, e.g. exported/showtell/1 (TF Serving's version folder).")
@search_options
@click.option("--top", default=3, type=click.IntRange(1, MAX_BEAM),
              help="Captions returned per image (at most --beam-size).")
@weights_option(help=_WEIGHTS.format("to export"))
@precision_option()
@overwrite_option(help="Replace a non-empty --out.")
def export_command(model_dir, out, overwrite, **params):
    """Export a model dir as a self-contained SavedModel: image bytes -> captions, for TF Serving.

    Signatures: serving_default(images string [N]) and caption_features(features float32 [N, 2048]), both
    -> captions string [N, top], log_probs float32 [N, top], ok bool [N]. Decoding, preprocessing, the CNN,
    the decoder and the beam search all run inside the graph; loading it needs TensorFlow only.
    """
    from decoder.infer.export import ExportConfig, export_model

    report = export_model(model_dir, out, _config(ExportConfig, params), overwrite=overwrite, log=log)
    click.echo(report.summary())


@main.command("finetune")
@click.option("--model-dir", required=True, help=f"{_TRAINED}: the starting point.")
@click.option("--images", required=True, multiple=True,
              help="Images root (repeatable, looked up in turn) holding the caption file's image paths.")
@caption_options(True, _CAPTION_FILES, _TRAIN_SPLIT)
@click.option("--out", required=True,
              help="NEW model dir to write (cnn.weights.h5 + decoder); rerunning the same command resumes.")
@loop_options("(image, caption) pair", "(pairs)", "Validation perplexity",
              "the last 3, ~90 MB each, plus the best by validation")
@caption_length_option
@click.option("--trainable-blocks", type=click.IntRange(0, 11),
              help="Train only the top N of InceptionV3's 11 mixed blocks (mixed10 down; 0 = CNN frozen). "
                   "Default: the whole CNN.")
@click.option("--image-size", type=IMAGE_SIZES,
              help="CNN input size (>= 75). Default: the model dir's CNN image size; smaller for a CPU "
                   "(an attention model dir: one giving its grid size).")
@learning_rate_option(default=0.0005, help="Constant SGD learning rate (im2txt phase 2).")
@seed_option(help="Seed of shuffles, image distortions and dropout.")
@click.option("--max-val-pairs", type=click.IntRange(min=0), default=2000,
              help="Validate on at most this many (image, caption) pairs (0: all).")
@precision_option()
@click.option("--decode-threads", type=click.IntRange(1, 256), default=8,
              help="Threads decoding image files for each batch.")
@weights_option(help=_WEIGHTS.format("to start from"))
@overwrite_option(help=_RERUN)
@no_progress_option
def finetune_command(out, overwrite, no_progress, **params):
    """Fine-tune the CNN and the decoder of a trained model dir end-to-end on images (im2txt phase 2).

    Recipe: SGD lr 0.0005 constant, clip 5.0, batch 32; training distortions (random crop, flip, colour
    jitter); batch norm in inference mode (moving statistics frozen). Writes a NEW model dir with
    cnn.weights.h5 and its fingerprint: `caption` uses it, `extract --cnn-weights OUT/cnn.weights.h5`
    re-extracts features with it. Same training loop as train-decoder (checkpoints, resume, GPUs).
    An attention model dir (--arch attend) works too: the CNN is reattached up to Mixed_7c (mixed10) and
    --image-size must give the model's grid size (its grid_shape; re-extract with extract --grid).
    """
    from decoder.train.config import TrainConfig
    from decoder.train.finetune import FinetuneConfig, finetune, phase2_recipe

    result = finetune(_config(FinetuneConfig, params), out, phase2_recipe(**_fields(TrainConfig, params)),
                      overwrite=overwrite, progress=not no_progress, log=log)
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val perplexity {result.val_perplexity:.3f} "
               f"(best {result.best_val_perplexity:.3f}) -> {out}")


def _scst_samples(params: dict) -> None:
    if params["baseline"] == "mean" and params["samples"] < 2:
        raise click.BadParameter(f"{params['samples']} is too few for --baseline mean, which compares each "
                                 "sample with the image's other samples: give 2 or more.",
                                 param_hint="'--samples'")


@main.command("train-scst", prechecks=(_scst_samples,))
@click.option("--model-dir", required=True,
              help="XE-trained model dir (train-decoder, finetune or import-im2txt): the starting point.")
@click.option("--features", required=True,
              help="Feature store of the model's CNN (extract): the training and validation images.")
@caption_options(True, "Caption file (repeatable) holding the splits and ALL their reference captions.",
                 _TRAIN_SPLIT)
@click.option("--out", required=True, help="NEW model dir to write; rerunning the same command resumes.")
@loop_options("image", "in images (each sampled --samples times)", "Validation CIDEr-D (greedy captions)",
              "the last 5, plus the best by validation CIDEr-D")
@click.option("--samples", type=click.IntRange(1, 64), default=5,
              help="Captions sampled per training image (temperature 1; 1..64).")
@click.option("--baseline", type=click.Choice(["mean", "greedy"]), default="mean",
              help="mean: each sample's baseline is the mean reward of the image's other samples (needs "
                   "--samples >= 2); greedy: the reward of the greedy caption (Rennie et al. 2017).")
@click.option("--max-length", type=click.IntRange(2, 1000), default=16,
              help="Most tokens per sampled caption, counting <S> and </S> (>= 2).")
@click.option("--cider-df", type=click.Choice(["train", "corpus"]), default="train",
              help="CIDEr-D document frequencies: of all training references, or of each batch's images.")
@learning_rate_option(default=5e-5, help="Constant Adam learning rate.")
@click.option("--max-val-images", type=click.IntRange(min=1),
              help="Validate on at most this many validation images (default: all).")
@seed_option(help="Seed of the shuffles and the sampled captions (a resumed run draws the same).")
@precision_option()
@in_memory_option
@weights_option(help=_WEIGHTS.format("to start from"))
@overwrite_option(help=_RERUN)
@no_progress_option
def train_scst_command(out, max_val_images, overwrite, no_progress, **params):
    """Self-critical training (SCST) of a trained decoder on CIDEr-D, from the feature cache.

    Per training image: --samples captions sampled from the model, reward = CIDEr-D against the image's
    references, loss = -(reward - baseline) * log p(caption) averaged over words; Adam lr 5e-5. Writes a
    NEW model dir (caption, evaluate and export use it as any other); validation = CIDEr-D of greedy
    captions of the val split. Same training loop as train-decoder (checkpoints, resume, GPUs).
    """
    from decoder.train.config import TrainConfig
    from decoder.train.scst import ScstConfig, scst_recipe, train_scst

    train = scst_recipe(**_fields(TrainConfig, params), max_val_pairs=max_val_images)
    result = train_scst(_config(ScstConfig, params), out, train, overwrite=overwrite,
                        progress=not no_progress, log=log)
    click.echo(f"step {result.step}, epoch {result.epoch:.2f}: val CIDEr-D (greedy) "
               f"{result.val_metrics.get('val_cider', float('nan')):.3f} (best {-result.best_score:.3f}) "
               f"-> {out}")


@main.command("evaluate")
@click.option("--model-dir", required=True, help=f"{_TRAINED}.")
@click.option("--features",
              help="Feature store of the split's images (same CNN as the model dir); or give --images.")
@click.option("--images", multiple=True,
              help="Images root (repeatable): without --features the CNN runs on the split's images; with "
                   "--features only the report's thumbnails come from here.")
@caption_options(True, "Caption file(s) holding the split and ALL its reference captions (repeatable).",
                 "Split scheme (none: every image).")
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]),
              help="The split to evaluate.")
@click.option("--out-dir", help="Folder of results.json and metrics.json [MODEL_DIR/eval-SPLIT].")
@click.option("--results", help="COCO results JSON [{image_id, caption}] [OUT_DIR/results.json].")
@click.option("--metrics", help="Metrics JSON (corpus + per-image scores) [OUT_DIR/metrics.json].")
@click.option("--report", help="Also write this self-contained HTML page: every image, worst CIDEr first.")
@search_options
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Images per CNN and search batch.")
@click.option("--max-images", type=click.IntRange(min=1),
              help="Evaluate only the first N images of the split.")
@click.option("--java", "java", default="auto", type=click.Choice(["auto", "yes", "no"]),
              help="PTB tokenizer + METEOR need java: auto (when on the PATH), yes (require it), no (never).")
@weights_option(help=_WEIGHTS.format("to evaluate"))
@precision_option()
@no_progress_option
def evaluate_command(java, no_progress, **params):
    """Score a model dir on one split: perplexity, beam-search captions, BLEU-1..4/METEOR/ROUGE-L/CIDEr.

    Captions are scored against ALL reference captions of each image with pycocoevalcap's scorers (without
    the eval extra: showtell's own BLEU, ROUGE-L and CIDEr, same numbers; METEOR and SPICE skipped). Prints
    the table; writes the COCO results JSON, the metrics JSON and (--report) an HTML error-analysis page.
    """
    from beam import SearchConfig
    from decoder.infer.evaluate import EvalConfig, run_evaluate

    cfg = _config(EvalConfig, params, use_java={"auto": "auto", "yes": True, "no": False}[java],
                  progress=not no_progress)
    result = run_evaluate(cfg, _config(SearchConfig, params), log=log)
    click.echo(result.table)
    click.echo(result.summary())


@main.command("demo")
@click.option("--workdir", default="demo_run",
              help="Folder for the generated data, features, model and reports; rerunning resumes.")
@click.option("--preset", default="full", type=click.Choice(["full", "tiny"]),
              help="full: the real demo (~4.5 min on 2 CPU cores); tiny: fewer images and steps (~1-2 min).")
@click.option("--fresh", is_flag=True,
              help="Remove what an earlier demo wrote in the workdir and start over.")
@no_progress_option
def demo_command(workdir, preset, fresh, no_progress):
    """Run the whole pipeline on generated coloured shapes: extract -> train-decoder -> caption -> evaluate.

    Prints each step's equivalent command line (copy them for real data) and ends with captions of
    held-out test images next to their references, and BLEU-4/CIDEr on the test split. Uses a random CNN
    (--cnn-weights none): real captions need ImageNet weights and COCO.
    """
    from decoder.demo import DemoConfig, run_demo

    run_demo(workdir, DemoConfig.preset(preset), fresh=fresh, progress=not no_progress, echo=click.echo,
             log=log)


if __name__ == "__main__":
    main()
