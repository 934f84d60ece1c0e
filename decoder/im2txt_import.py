"""`import-im2txt`: an im2txt (TF1) checkpoint + its word_counts.txt -> a normal showtell model dir.

im2txt variables (no TF1 graph is built; `tf.train.load_checkpoint` reads them):
  image_embedding/weights [D, E] -> `image_embedding` kernel;  seq_embedding/map [V, E] -> `seq_embedding`;
  logits/weights [U, V], logits/biases [V] -> `logits`;  InceptionV3/... (TF-slim) -> cnn.weights.h5;
  the LSTM under one of three names (TF versions): lstm/basic_lstm_cell/{kernel,bias},
  lstm/basic_lstm_cell/{weights,biases}, lstm/BasicLSTMCell/Linear/{Matrix,Bias}.
BasicLSTMCell computes `[x, h] @ W + b` split into gates (i, j, f, o), `c' = c*sig(f + 1) + sig(i)*tanh(j)`,
`h' = tanh(c')*sig(o)`, state [c, h]. Keras' LSTMCell uses (i, f, c, o), a kernel for x and a recurrent
kernel for h, sig(f) without +1 and state (h, c): the columns are reordered, W is split at row E, and the
forget bias 1.0 is added to b_f. The embedding and logits keep all V rows (12000 in im2txt) with the
vocabulary's ids; V may exceed the vocabulary (11519 lines + <UNK>): the model config's vocab_size is V,
ids >= len(vocab) decode as <UNK>. `global_step`, optimizer slots and slim's classifier heads are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from base.errors import InputError
from base.locks import exclusive
from data.integrity import describe_nonfinite, nonfinite_weights
from data.vocab import Vocabulary
from decoder.config import ModelConfig
from decoder.model import build_decoder
from decoder.modeldir import read_config, save_model_dir
from extract.encoder import FEATURE_DIM, CNNSpec, build_encoder, encoder_and_spec, weights_fingerprint
from extract.inputs import check_output_dir
from extract.slim import SCOPE, CheckpointReader, assign_slim_weights, is_skippable

IMAGE_EMBEDDING = "image_embedding/weights"
SEQ_EMBEDDING = "seq_embedding/map"
LOGITS_W, LOGITS_B = "logits/weights", "logits/biases"
# (kernel, bias) names of im2txt's BasicLSTMCell, newest TF first.
LSTM_NAMES = (("lstm/basic_lstm_cell/kernel", "lstm/basic_lstm_cell/bias"),
              ("lstm/basic_lstm_cell/weights", "lstm/basic_lstm_cell/biases"),
              ("lstm/BasicLSTMCell/Linear/Matrix", "lstm/BasicLSTMCell/Linear/Bias"))
FORGET_BIAS = 1.0  # BasicLSTMCell's default forget_bias, which im2txt uses


@dataclass
class ImportReport:
    """What `import_im2txt` did (printed by the CLI, recorded in config.json under "import")."""

    checkpoint: str  # the checkpoint prefix read
    lstm_names: tuple  # (kernel, bias) names of the LSTM variant found
    model_config: object  # decoder.config.ModelConfig of the imported decoder
    vocab_words: int  # len(vocabulary) (<= model_config.vocab_size)
    cnn: dict  # the CNN block written to config.json
    used: list = field(default_factory=list)  # checkpoint names whose values were imported
    skipped: list = field(default_factory=list)  # checkpoint names deliberately not imported
    global_step: int | None = None  # the checkpoint's training step, when saved
    reads: dict = field(default_factory=dict)  # checkpoint name -> number of times its value was read

    def summary(self) -> str:
        """One line."""
        c = self.model_config
        step = "" if self.global_step is None else f" at step {self.global_step}"
        return (f"imported {self.checkpoint}{step}: {len(self.used)} variables (decoder E={c.embedding_size} "
                f"U={c.lstm_units} V={c.vocab_size}, vocabulary {self.vocab_words} words, CNN "
                f"{self.cnn.get('weights')}), {len(self.skipped)} skipped")


def find_lstm(reader: CheckpointReader) -> tuple[str, str]:
    """The (kernel, bias) names of the one LSTM variant in the checkpoint; InputError otherwise."""
    found = [pair for pair in LSTM_NAMES if pair[0] in reader.shapes or pair[1] in reader.shapes]
    if not found:
        raise InputError(f"The checkpoint {reader.prefix} lacks the LSTM variable {LSTM_NAMES[0][0]} "
                         f"(or {LSTM_NAMES[1][0]}, {LSTM_NAMES[2][0]}): not an im2txt checkpoint.")
    if len(found) > 1:
        raise InputError(f"The checkpoint {reader.prefix} has two LSTMs ({found[0][0]} and {found[1][0]}).")
    return found[0]


def decoder_shapes(reader: CheckpointReader, lstm: tuple[str, str]):
    """ModelConfig of the checkpoint's decoder, after checking every decoder shape (InputError on any)."""
    for name in (IMAGE_EMBEDDING, SEQ_EMBEDDING, LOGITS_W, LOGITS_B) + lstm:
        if name not in reader.shapes:
            raise InputError(f"The checkpoint {reader.prefix} lacks the variable {name}.")
    for name, rank in ((IMAGE_EMBEDDING, 2), (SEQ_EMBEDDING, 2), (lstm[1], 1)):
        if len(reader.shapes[name]) != rank:
            raise InputError(f"The checkpoint {reader.prefix} variable {name} has shape "
                             f"{list(reader.shapes[name])}, expected rank {rank}.")
    feature_dim, emb = reader.shapes[IMAGE_EMBEDDING]
    vocab_size = reader.shapes[SEQ_EMBEDDING][0]
    units = reader.shapes[lstm[1]][0] // 4
    reader.check(SEQ_EMBEDDING, (vocab_size, emb))
    reader.check(lstm[1], (4 * units,))
    reader.check(lstm[0], (emb + units, 4 * units))
    reader.check(LOGITS_W, (units, vocab_size))
    reader.check(LOGITS_B, (vocab_size,))
    if units == 0:
        raise InputError(f"The checkpoint {reader.prefix} variable {lstm[1]} is empty.")
    return ModelConfig(vocab_size=vocab_size, embedding_size=emb, lstm_units=units, feature_dim=feature_dim)


def convert_lstm(kernel: np.ndarray, bias: np.ndarray, input_size: int, forget_bias: float = FORGET_BIAS):
    """BasicLSTMCell (W [E+U, 4U] over [x, h], b [4U], gates i,j,f,o, sig(f + forget_bias)) -> Keras
    LSTMCell (kernel [E, 4U], recurrent_kernel [U, 4U], bias [4U], gates i,f,c,o, sig(f)). float32 numpy."""
    wi, wj, wf, wo = np.split(np.asarray(kernel, np.float32), 4, axis=1)
    bi, bj, bf, bo = np.split(np.asarray(bias, np.float32), 4)
    full = np.concatenate([wi, wf, wj, wo], axis=1)
    return full[:input_size], full[input_size:], np.concatenate([bi, bf + np.float32(forget_bias), bj, bo])


def convert_decoder(reader: CheckpointReader, seed: int = 0):
    """Build our ShowAndTell decoder with the checkpoint's weights. Returns (model, ModelConfig, names)."""
    lstm = find_lstm(reader)
    config = decoder_shapes(reader, lstm)
    model = build_decoder(config, seed=seed)
    kernel, recurrent, bias = convert_lstm(reader.get(lstm[0]), reader.get(lstm[1]), config.embedding_size)
    model.image_embedding.kernel.assign(reader.get(IMAGE_EMBEDDING))
    model.seq_embedding.embeddings.assign(reader.get(SEQ_EMBEDDING))
    model.lstm.kernel.assign(kernel)
    model.lstm.recurrent_kernel.assign(recurrent)
    model.lstm.bias.assign(bias)
    model.logits.kernel.assign(reader.get(LOGITS_W))
    model.logits.bias.assign(reader.get(LOGITS_B))
    return model, config, [IMAGE_EMBEDDING, SEQ_EMBEDDING, *lstm, LOGITS_W, LOGITS_B]


def check_finite(reader: CheckpointReader, model, lstm: tuple[str, str], encoder=None) -> None:
    """InputError (before anything is written) when a converted weight of the decoder `model` or the
    `encoder` (either may be None) holds NaN or Inf: such a model captions nothing (every word gets
    p < 1e-12). Named by checkpoint variable (decoder) or Keras path (CNN)."""
    named = [] if model is None else [
        (IMAGE_EMBEDDING, model.image_embedding.kernel), (SEQ_EMBEDDING, model.seq_embedding.embeddings),
        (lstm[0], model.lstm.kernel), (lstm[0], model.lstm.recurrent_kernel), (lstm[1], model.lstm.bias),
        (LOGITS_W, model.logits.kernel), (LOGITS_B, model.logits.bias)]
    named += [(f"{SCOPE} ({v.path})", v) for v in (encoder.weights if encoder is not None else [])]
    bad = nonfinite_weights((name, np.asarray(var.numpy())) for name, var in named)
    if bad:
        raise InputError(f"The checkpoint {reader.prefix} holds {describe_nonfinite(bad)}: it is damaged or "
                         "diverged; nothing was imported.")


def check_names(reader: CheckpointReader, lstm: tuple[str, str], has_cnn: bool) -> list[str]:
    """InputError on a variable that is neither im2txt's nor skippable; returns the skipped names."""
    decoder = {IMAGE_EMBEDDING, SEQ_EMBEDDING, LOGITS_W, LOGITS_B, *lstm}
    skipped = []
    for name in sorted(reader.shapes):
        if is_skippable(name):
            skipped.append(name)
        elif name not in decoder and not (has_cnn and name.startswith(SCOPE + "/")):
            raise InputError(f"The checkpoint {reader.prefix} has an unknown variable {name} "
                             "(not one of im2txt's).")
    return skipped


def check_out_dir(out_dir: Path, prefix: str) -> None:
    """Refuse to overwrite a model dir that is not an earlier import of the same checkpoint."""
    if not (out_dir / "config.json").exists():
        return
    try:
        previous = read_config(out_dir).get("import", {}).get("checkpoint")
    except InputError:  # not ours, or damaged: never overwrite it
        previous = None
    if previous != prefix:
        raise InputError(f"{out_dir} already holds a model dir; choose another --out.")


def _cnn(reader: CheckpointReader, has_cnn: bool, cnn_weights: str | None, image_size: int):
    """(encoder, CNN block, names used) for the checkpoint's own InceptionV3 or `cnn_weights`."""
    if has_cnn:
        if cnn_weights is not None:
            raise InputError(f"The checkpoint {reader.prefix} has its own InceptionV3: drop --cnn-weights.")
        encoder = build_encoder(CNNSpec(weights="none", image_size=image_size))
        used = assign_slim_weights(encoder, reader)
        spec = CNNSpec(weights=f"slim:{reader.prefix}", image_size=image_size,
                       fingerprint=weights_fingerprint(encoder))
        return encoder, spec.to_dict(), used
    if cnn_weights is None:
        raise InputError(f"The checkpoint {reader.prefix} has no {SCOPE} variables: give --cnn-weights "
                         "(imagenet, none, a Keras weights file or slim:<inception_v3.ckpt>).")
    _, spec = encoder_and_spec(CNNSpec(weights=cnn_weights, image_size=image_size))
    return None, spec.to_dict(), []


def import_im2txt(checkpoint, vocab_path, out_dir, cnn_weights: str | None = None,
                  image_size: int = 299) -> ImportReport:
    """Convert an im2txt checkpoint into a model dir at `out_dir` (config.json, word_counts.txt,
    decoder.weights.h5, cnn.weights.h5 when the checkpoint holds the InceptionV3). Everything is
    validated (names, shapes, vocabulary size) before any value is read or any file written."""
    reader = CheckpointReader(checkpoint)
    vocab = Vocabulary.load(vocab_path)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "--out")
    with exclusive(out_dir, folder=True):
        check_out_dir(out_dir, reader.prefix)
        return _import(reader, vocab, vocab_path, out_dir, cnn_weights, image_size)


def _import(reader: CheckpointReader, vocab: Vocabulary, vocab_path, out_dir: Path, cnn_weights: str | None,
            image_size: int) -> ImportReport:
    lstm = find_lstm(reader)
    config = decoder_shapes(reader, lstm)
    if len(vocab) > config.vocab_size:
        raise InputError(f"The vocabulary {vocab_path} has {len(vocab)} words (with <UNK>) but the "
                         f"checkpoint's {SEQ_EMBEDDING} has only {config.vocab_size} rows.")
    has_cnn = any(name.startswith(SCOPE + "/") and not is_skippable(name) for name in reader.shapes)
    skipped = check_names(reader, lstm, has_cnn)
    if config.feature_dim != FEATURE_DIM:
        raise InputError(f"The checkpoint {reader.prefix} variable {IMAGE_EMBEDDING} has shape "
                         f"{[config.feature_dim, config.embedding_size]}, expected "
                         f"[{FEATURE_DIM}, {config.embedding_size}] (the InceptionV3 feature).")
    model, config, dec_used = convert_decoder(reader)
    check_finite(reader, model, lstm)  # before the CNN is built
    encoder, cnn, cnn_used = _cnn(reader, has_cnn, cnn_weights, image_size)
    check_finite(reader, None, lstm, encoder)
    step = None
    if "global_step" in reader.shapes and reader.shapes["global_step"] == ():
        step = int(reader.get("global_step", (), dtype=np.int64))
    report = ImportReport(checkpoint=reader.prefix, lstm_names=lstm, model_config=config,
                          vocab_words=len(vocab), cnn=cnn, used=cnn_used + dec_used, skipped=skipped,
                          global_step=step, reads=reader.reads)
    extra = {"import": {"from": "im2txt", "checkpoint": reader.prefix, "vocab": os.path.abspath(vocab_path),
                        "lstm_variables": list(lstm), "global_step": step, "forget_bias_folded": FORGET_BIAS,
                        "vocab_words": len(vocab), "skipped": skipped}}
    save_model_dir(out_dir, model, config, vocab, cnn, extra=extra, cnn_weights_src=encoder,
                   command="import-im2txt")
    return report
