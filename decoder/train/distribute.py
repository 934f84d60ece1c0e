"""Roles of the processes of a tf.distribute run: which one is the chief, where each writes, which replicas
an input pipeline feeds. The strategy itself comes from base.devices.choose_strategy."""

from __future__ import annotations

import json
import os
from pathlib import Path


def worker_role(strategy) -> tuple[bool, int]:
    """(is_chief, task index) of this process; (True, 0) outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not os.environ.get("TF_CONFIG"):
        return True, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
    if task_type == "chief":
        return True, 0
    has_chief = "chief" in cluster
    index = task_id + (1 if has_chief else 0)
    return (not has_chief and task_id == 0), index


def worker_dir(model_dir: Path, strategy) -> Path:
    """Where this process writes: the model dir for the chief, `<model dir>/worker-<k>` for other workers
    (their copies stay in step with the chief's, so each can resume)."""
    chief, index = worker_role(strategy)
    return Path(model_dir) if chief else Path(model_dir) / f"worker-{index}"


def input_replicas(ctx) -> list[int]:
    """Global replica ids fed by this input pipeline (consecutive block of the pipeline's local replicas)."""
    local = ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines)
    return [ctx.input_pipeline_id * local + j for j in range(local)]
