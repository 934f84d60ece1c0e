"""The attention tests' data (issue 18), in one place: a small generated shapes set at 160 px (the size where
InceptionV3's Mixed_7c grid is 3x3), its grid store, and a tiny attention decoder trained on it in-process.
Used by test_attention, test_attention_finetune, test_attention_export and test_attention_report."""

from __future__ import annotations

from pathlib import Path

SIZE = 160  # InceptionV3's Mixed_7c is 3x3 at 160 px
CELLS = 9  # h * w of that grid


def grid_shapes(root: Path, n_images: int = 40) -> Path:
    """Generate `n_images` shapes (seed 3) of SIZE px under root; returns captions.json."""
    from data.synthetic import generate_shapes

    return generate_shapes(root, n_images=n_images, image_size=SIZE, seed=3)


def extract_grid(out: Path, images: Path, captions: Path | None = None, **overrides):
    """`extract --grid` of `images` (a folder, with `captions`; or a list of files/folders without) into
    `out` in this process: random CNN, SIZE px, batch 8, float32 compute, the default float16 store;
    `overrides` change ExtractConfig fields. Returns the ExtractResult."""
    from extract.run import ExtractConfig, run_extract

    cfg = dict(out=str(out), cnn_weights="none", image_size=SIZE, batch_size=8, progress=False, grid=True,
               precision="float32")
    if captions:
        cfg.update(images=[str(images)], captions=[str(captions)])
    else:
        cfg.update(paths=[str(images)])
    return run_extract(ExtractConfig(**{**cfg, **overrides}), log=lambda *_: None)


def shapes_with_grid(root: Path) -> tuple[Path, Path]:
    """grid_shapes + extract_grid under root: (captions.json, root/grid.h5)."""
    captions = grid_shapes(root)
    extract_grid(root / "grid.h5", root / "images", captions)
    return captions, root / "grid.h5"


def train_tiny_attend(store: Path, captions: Path, model_dir: Path, steps: int, units: int = 16,
                      learning_rate: float = 0.01, **train):
    """`train-decoder --arch attend` in this process: E = U = `units`, A = 8, standardised cells, Adam at
    `learning_rate`, batch 16, float32, no mid-run validation or checkpoint unless `train` (TrainConfig
    fields) says so. With the zero initial state a 16-wide decoder still says only "a" after 120 steps: a
    model whose captions a test reads is 32 wide. Returns the TrainResult."""
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    cfg = TrainConfig(**{"steps": steps, "batch_size": 16, "optimizer": "adam",
                         "learning_rate": learning_rate, "eval_every": 0, "checkpoint_every": steps,
                         "precision": "float32", **train})
    return train_decoder(DataConfig(features=str(store), captions=[str(captions)], min_word_count=1),
                         Path(model_dir), cfg, embedding_size=units, lstm_units=units,
                         feature_norm="standardize", arch="attend", attention_units=8, progress=False,
                         log=lambda *_: None)
