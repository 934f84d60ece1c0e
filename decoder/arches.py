"""The decoder architectures a model dir can hold, and THE place that picks one (`--arch`).

config.json's top-level "arch" names it; absent means "show-and-tell" (decoder.model.ShowAndTell over the
pooled feature, im2txt's model: its config.json is unchanged), "attend" is decoder.attend.ShowAttendTell
over the grid of a store written by `extract --grid`. Both honour the same contract (initial_state, step,
loss_sums), so training, checkpoints, resume and the searches do not know which one they run.
"""

from __future__ import annotations

from base.errors import InputError
from decoder.attend import ARCH as ATTEND
from decoder.attend import AttendConfig, build_attend
from decoder.config import ModelConfig
from decoder.model import build_decoder

DEFAULT = "show-and-tell"
ARCHES = (DEFAULT, ATTEND)
__all__ = ["ARCHES", "ATTEND", "DEFAULT", "AttendConfig", "arch_name", "arch_of", "build_model", "grid_shape",
           "model_config_from"]


def arch_of(config: dict) -> str:
    """The architecture a model dir's config.json records (absent: show-and-tell); InputError if unknown."""
    arch = config.get("arch", DEFAULT)
    if arch not in ARCHES:
        raise InputError(f"the model dir's config.json names architecture {arch!r}; this showtell knows "
                         f"{', '.join(ARCHES)}.")
    return arch


def arch_name(model_config) -> str:
    """The architecture of a model config object (ModelConfig or AttendConfig)."""
    return ATTEND if isinstance(model_config, AttendConfig) else DEFAULT


def model_config_from(config: dict):
    """The model config (ModelConfig or AttendConfig) of a model dir's config.json."""
    cls = AttendConfig if arch_of(config) == ATTEND else ModelConfig
    return cls.from_dict(config["model"])


def build_model(model_config, seed: int | None = None):
    """The decoder of `model_config`'s architecture, weights created (seeded when `seed` is given)."""
    if isinstance(model_config, AttendConfig):
        return build_attend(model_config, seed=seed)
    return build_decoder(model_config, seed=seed)


def grid_shape(model_config) -> tuple[int, int] | None:
    """(h, w) of the grid the decoder reads; None for a decoder of pooled features."""
    return tuple(model_config.grid_shape) if isinstance(model_config, AttendConfig) else None
