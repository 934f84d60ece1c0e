"""The frozen InceptionV3 encoder: float32 [B, S, S, 3] in [-1, 1] -> float32 [B, 2048] (global average pool).

The CNN block (`CNNSpec.to_dict()`) identifies the encoder everywhere: the feature store's attrs, the model
dir's config.json. `weights` is one of:
  "imagenet"      Keras' own ImageNet weights (downloaded once into ~/.keras/models, then cached);
  "none"          random init after `keras.utils.set_random_seed(seed)` (tests, demo): rebuildable;
  "<path>"        a local Keras weights file (`*.weights.h5`, e.g. a fine-tuned CNN);
  "slim:<ckpt>"   a TF-slim InceptionV3 checkpoint (im2txt), loaded by `extract.slim.load_slim_weights`.
The fingerprint is the SHA-256 of every weight's shape and float32 bytes, in model order.
"""

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields

import keras
import numpy as np

from base.errors import InputError
from extract.preprocess import IM2TXT_SIZE, resize_size
from extract.slim import load_slim_weights

ARCH = "InceptionV3"
FEATURE_DIM = 2048
MIN_IMAGE_SIZE = 75  # smallest input InceptionV3 accepts


@dataclass
class CNNSpec:
    """The CNN block: which encoder produced (or must produce) the features."""

    arch: str = ARCH  # network architecture; only "InceptionV3"
    weights: str = "imagenet"  # "imagenet" | "none" | path to a Keras weights file | "slim:<checkpoint>"
    seed: int = 0  # seed of the random init when weights == "none"
    image_size: int = IM2TXT_SIZE  # crop size S fed to the CNN (>= 75)
    resize_size: int = field(default=0)  # resize before the central crop; 0 = round(S * 346 / 299)
    fingerprint: str = ""  # SHA-256 of the weights ("" until the encoder has been built)

    def __post_init__(self):
        if not self.resize_size:
            self.resize_size = resize_size(self.image_size)

    def to_dict(self) -> dict:
        """JSON-able dict (the CNN block)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, block: dict) -> "CNNSpec":
        """Inverse of `to_dict`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(block).items() if k in names})


def weights_fingerprint(model) -> str:
    """Hex SHA-256 of all weights of `model` (shape + float32 bytes, in model order)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(repr(tuple(value.shape)).encode())
        digest.update(value.astype(np.float32, copy=False).tobytes())
    return digest.hexdigest()


def check_spec(spec: CNNSpec) -> None:
    """InputError for an unknown architecture, a size below 75 px or a missing weights file."""
    if spec.arch != ARCH:
        raise InputError(f"CNN architecture {spec.arch!r} is not supported (only {ARCH}).")
    if spec.image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {spec.image_size} is too small: InceptionV3 needs at least 75 px.")
    weights = spec.weights
    if weights in ("imagenet", "none"):
        return
    path = weights[len("slim:") :] if weights.startswith("slim:") else weights
    if weights.startswith("slim:"):
        if not (os.path.exists(path) or os.path.exists(path + ".index")):
            raise InputError(f"CNN checkpoint {path} does not exist.")
    elif not os.path.isfile(path):
        raise InputError(
            f"CNN weights file {path} does not exist (use imagenet, none, a weights file or slim:<ckpt>)."
        )


def _inception(spec: CNNSpec, weights, grid: bool = False):
    size = spec.image_size
    return keras.applications.InceptionV3(
        include_top=False, weights=weights, input_shape=(size, size, 3), pooling=None if grid else "avg"
    )


def grid_size(image_size: int) -> int:
    """h (= w) of InceptionV3's Mixed_7c map for S x S inputs (8 at 299 px, 3 at 160 px, 1 at 75-138 px):
    three stride-2 'valid' 3x3 convolutions/poolings after the stem's, as Keras builds it."""
    size = (int(image_size) - 3) // 2 + 1 - 2  # conv 3x3/2 valid, conv 3x3 valid
    size = (size - 3) // 2 + 1 - 2  # max-pool 3x3/2, conv 3x3 valid
    size = (size - 3) // 2 + 1  # max-pool 3x3/2 (35x35 at 299 px)
    size = (size - 3) // 2 + 1  # Mixed_6a (17x17)
    return (size - 3) // 2 + 1  # Mixed_7a (8x8)


def build_encoder(cnn, grid: bool = False) -> "keras.Model":  # noqa: F821
    """Build the frozen encoder for a CNN block (dict or CNNSpec): float32 [B,S,S,3] -> float32 [B,2048],
    or with `grid` the Mixed_7c map float32 [B, h, w, 2048] whose mean over h, w is that pooled vector (no
    weights differ: same fingerprint).

    Raises InputError for an unknown architecture, a too small size or a missing weights file. Does not
    check `fingerprint`; use `encoder_and_spec` or `weights_fingerprint` for that.
    """
    spec = cnn if isinstance(cnn, CNNSpec) else CNNSpec.from_dict(cnn)
    check_spec(spec)
    if spec.weights == "imagenet":
        model = _inception(spec, "imagenet", grid)
    elif spec.weights == "none":
        keras.utils.set_random_seed(int(spec.seed))
        model = _inception(spec, None, grid)
    elif spec.weights.startswith("slim:"):
        model = _inception(spec, None, grid)
        load_slim_weights(model, spec.weights[len("slim:") :])
    else:
        model = _inception(spec, None, grid)
        try:
            model.load_weights(spec.weights)
        except Exception as err:  # noqa: BLE001 - any loader failure is a bad argument
            raise InputError(f"CNN weights file {spec.weights} does not fit InceptionV3: {err}") from None
    model.trainable = False
    return model


def check_fingerprint(got: str, want: str, built_from: str, recorded_in: str, strict: bool = False) -> None:
    """THE CNN fingerprint check: InputError when the fingerprint `got` of the CNN of `built_from` (built
    weights, or a feature store) is not `want`, recorded in `recorded_in`. An empty `want` (not recorded)
    passes unless `strict` (store vs model dir: both must record the same)."""
    if (want or strict) and got != want:
        raise InputError(f"{built_from} has CNN fingerprint {got[:12] or 'none'} but {recorded_in} records "
                         f"{want[:12] or 'none'}: features and model must come from the same CNN weights "
                         "(re-extract with the model's CNN).")


def check_same_cnn(store_cnn: dict, model_cnn: dict, store_name, model_name) -> None:
    """InputError unless a feature store's CNN block matches a model dir's: fingerprint and image size."""
    check_fingerprint(store_cnn.get("fingerprint", ""), model_cnn.get("fingerprint", ""),
                      f"feature store {store_name}", str(model_name), strict=True)
    if int(store_cnn.get("image_size", 0)) != int(model_cnn.get("image_size", 0)):
        raise InputError(f"feature store {store_name} has image size {store_cnn.get('image_size')} but "
                         f"{model_name} expects {model_cnn.get('image_size')}.")


def encoder_and_spec(cnn, expect_fingerprint: bool = False, grid: bool = False):
    """Build the encoder (with `grid`: the Mixed_7c map, see build_encoder) and return (model, CNNSpec with
    its fingerprint filled in).

    With `expect_fingerprint` and a non-empty `fingerprint` in `cnn`, a different one raises InputError.
    """
    spec = cnn if isinstance(cnn, CNNSpec) else CNNSpec.from_dict(cnn)
    model = build_encoder(spec, grid)
    got = weights_fingerprint(model)
    if expect_fingerprint:
        check_fingerprint(got, spec.fingerprint, spec.weights, "the CNN block")
    return model, CNNSpec(**{**spec.to_dict(), "fingerprint": got})
