"""cli.py's shared options: an option that several commands take means the same everywhere (same type, range,
choices and default rule), the training commands share one loop option group, and each command's option
values reach its package config unchanged. Parsing only: no model is built, no command runs."""

import click
import pytest

import cli

TRAINING = ("train-decoder", "finetune", "train-scst")
LOOP = ("steps", "epochs", "batch_size", "clip_gradients", "eval_every", "checkpoint_every")


def _options(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.main.commands[command].params if isinstance(p, click.Option)}


def _kind(option: click.Option) -> tuple:
    """What a user can give the option: its type's class and its range or choices, flag or not, repeatable."""
    kind = option.type
    bounds = tuple(getattr(kind, a, None) for a in ("min", "max", "min_open", "max_open"))
    return type(kind).__name__, bounds, tuple(getattr(kind, "choices", ())), option.is_flag, option.multiple


@pytest.mark.parametrize("name", ["seed", "precision", "no_progress", "overwrite", "learning_rate", *LOOP,
                                  "max_caption_length", "in_memory", "beam_size", "max_length",
                                  "length_normalization", "caption_format", "split_scheme"])
def test_an_option_shared_by_commands_accepts_the_same_values_everywhere(name):
    found = {cmd: _options(cmd)[name] for cmd in cli.main.commands if name in _options(cmd)}
    assert len(found) >= 2, f"--{name} is no longer shared: {sorted(found)}"
    kinds = {cmd: _kind(option) for cmd, option in found.items()}
    assert len(set(kinds.values())) == 1, kinds


def test_precision_offers_auto_and_the_three_precisions_wherever_it_exists():
    with_precision = [cmd for cmd in cli.main.commands if "precision" in _options(cmd)]
    assert set(TRAINING) <= set(with_precision)
    for cmd in with_precision:
        assert tuple(_options(cmd)["precision"].type.choices) == ("auto", "float32", "mixed_float16",
                                                                  "mixed_bfloat16"), cmd


def test_the_training_commands_share_the_loop_options_and_their_defaults():
    for name in LOOP:
        defaults = {cmd: _options(cmd)[name].default for cmd in TRAINING}
        assert len(set(defaults.values())) == 1, (name, defaults)
    scst = _options("train-scst")
    assert "image" in scst["epochs"].help and "CIDEr-D" in scst["eval_every"].help  # its own units named


def _parse(args: list[str]) -> dict:
    return cli.main.commands[args[0]].make_context(args[0], args[1:]).params


def test_parsed_options_reach_the_package_configs_unchanged():
    from beam import SearchConfig
    from decoder.train.config import TrainConfig
    from decoder.train.scst import ScstConfig
    from extract.run import ExtractConfig

    params = _parse(["extract", "a.jpg", "b/", "--out", "f.h5", "--images", "i1", "--images", "i2",
                     "--views", "3", "--seed", "7", "--no-progress"])
    cfg = cli._config(ExtractConfig, params, progress=not params["no_progress"])
    assert (cfg.paths, cfg.images, cfg.views, cfg.seed, cfg.progress) == (["a.jpg", "b/"], ["i1", "i2"], 3, 7,
                                                                          False)
    params = _parse(["train-scst", "--model-dir", "m", "--features", "f.h5", "--captions", "c.json",
                     "--out", "o", "--steps", "9", "--samples", "4", "--clip-gradients", "2.5",
                     "--precision", "float32"])
    train = TrainConfig(**cli._fields(TrainConfig, params))
    assert (train.steps, train.clip_gradients, train.precision, train.batch_size) == (9, 2.5, "float32", 32)
    scst = cli._config(ScstConfig, params)
    assert (scst.captions, scst.samples, scst.max_length) == (["c.json"], 4, 16)
    search = cli._config(SearchConfig, _parse(["caption", "x.jpg", "--model-dir", "m", "--beam-size", "5",
                                               "--sample", "--top-k", "4"]))
    assert (search.beam_size, search.sample, search.top_k, search.max_length) == (5, True, 4, 20)
