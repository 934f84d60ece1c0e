"""The Ray Data stages of `extract --engine ray` (extract/ray_engine.py drives them).

`decode_rows` (CPU tasks, one per input shard, in parallel): indexes its shard and reads each sample's image
bytes in place (data.shards)
and runs THE decode + preprocess of the local engine (extract.preprocess), yielding one row per sample:
{"shard": str, "row": int (index within the shard), "pixels": float32 [S, S, 3], "ok": bool, "error": str}.
`ShardEncoder` (an actor pool; one GPU per actor when the cluster has GPUs): builds the encoder once per actor
(extract.pipeline.inference_encoder, in the run's compute precision resolved on the driver: the same CNN,
precision and fingerprint as the local engine) and
maps a batch of rows to {"shard", "row", "features": float32 [B, 2048], "ok", "error", "fingerprint",
"precision"} (with --grid also "grid": float32 [B, h, w, 2048], features = its mean over h, w: the local
engine's extract.pipeline.encode_batch). Ray restarts a killed actor and retries its batch (Ray Data's
defaults for actor pools).
"""

import numpy as np

from data.shard_readers import ShardColumns, index_parquet, index_webdataset
from extract.pipeline import encode_batch, inference_encoder, read_source
from extract.preprocess import BadImage, decode_image, preprocess


def shard_members(task: dict, columns: ShardColumns) -> list:
    """The image locations of one input shard, indexed here on the worker (headers / key column only):
    task {"shard": path, "format": "webdataset" | "parquet", "rows": rows the driver indexed}. RuntimeError
    when the shard changed since the driver indexed it."""
    if task["format"] == "webdataset":
        samples, _ = index_webdataset(task["shard"])
    else:
        samples, _ = index_parquet(task["shard"], columns)
    if len(samples) != task["rows"]:
        raise RuntimeError(f"shard {task['shard']} changed during the run ({len(samples)} samples now, "
                           f"{task['rows']} when the run started)")
    return [s.member for s in samples]


def decode_rows(task: dict, image_size: int, max_pixels: int, columns: ShardColumns):
    """One input shard's rows (task: see `shard_members`) -> an iterator of row dicts (module docstring).
    A bad image is a row with ok False, a black image and the reason, as in the local engine."""
    for row, member in enumerate(shard_members(task, columns)):
        try:
            image, ok, error = decode_image(read_source(member), image_size, max_pixels), True, ""
        except BadImage as err:
            image, ok, error = np.zeros((1, 1, 3), np.uint8), False, str(err)
        pixels = preprocess(image, image_size).numpy()
        yield {"shard": task["shard"], "row": row, "pixels": pixels, "ok": ok, "error": error}


class ShardEncoder:
    """The CNN of one actor: a batch of decoded rows -> their pooled features (float32 [B, 2048]) and, with
    `grid`, their Mixed_7c grids (float32 [B, h, w, 2048])."""

    def __init__(self, spec: dict, precision: str, grid: bool = False):
        self.infer, built = inference_encoder(spec, precision, grid=grid)
        self.fingerprint, self.precision, self.grid = built.fingerprint, precision, grid

    def __call__(self, batch: dict) -> dict:
        pixels = np.stack(list(batch["pixels"])).astype(np.float32)
        n = len(pixels)
        pooled, grid = encode_batch(self.infer, pixels, self.grid)
        out = {"shard": batch["shard"], "row": batch["row"], "features": pooled,
               "ok": batch["ok"], "error": batch["error"], "fingerprint": np.array([self.fingerprint] * n),
               "precision": np.array([self.precision] * n)}
        return out if grid is None else {**out, "grid": grid}
