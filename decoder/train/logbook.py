"""Metrics of a training run: TensorBoard (tf.summary) under `<model dir>/logs` and `metrics.jsonl`.

Every metrics.jsonl row has `step` and `epoch` (fractional: step / steps per epoch) plus the values.
On resume, rows written after the restored checkpoint are dropped (rewritten atomically) so a resumed run
does not log a step twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from base.atomic import atomic_write_text


def _scalar_metadata() -> bytes:
    """SummaryMetadata of a TensorBoard scalar (written without needing the tensorboard package)."""
    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    return meta.SerializeToString()


class Logbook:
    """Writes metric rows to TensorBoard and metrics.jsonl (only when `enabled`, i.e. on the chief)."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self.path = self.directory / "metrics.jsonl"
        self._writer = None

    def truncate_after(self, step: int) -> None:
        """Drop the rows with step > `step` (called when resuming from that step)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line from a kill
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, step: int, epoch: float, kind: str, values: dict) -> dict:
        """Log `values` ({name: float}) at `step`; kind: the row's group (the loop writes "eval": a
        validation with the train loss since the previous one). Returns the row."""
        row = {"step": int(step), "epoch": round(float(epoch), 4), "kind": kind,
               "time": round(time.time(), 3)}
        row.update({k: float(v) for k, v in values.items()})
        if not self.enabled:
            return row
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.directory / "logs"))
        with self._writer.as_default(step=int(step)):
            for name, value in values.items():
                tf.summary.write(f"{kind}/{name}", tf.constant(float(value), tf.float32),
                                 metadata=_scalar_metadata())
        self._writer.flush()
        line = (json.dumps(row) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return row

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
