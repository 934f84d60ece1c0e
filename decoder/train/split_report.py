"""One split of the caption file(s) made ready for a training command: the split's records -> matched with
their images -> one log line of what was found and skipped -> refused (one InputError sentence) when empty.

train-decoder and finetune match (image, caption) pairs (data.pipeline.match_pairs against the feature store,
decoder.train.image_batches.image_pairs against the --images roots); train-scst matches images with all their
references (decoder.train.scst_data.split_images). `pairs_summary` is the log text of the two pair commands.
"""

from __future__ import annotations

from base.errors import InputError


def split_records(annotations, split: str) -> list:
    """The records (data.captions.ImageRecord) of `split`; InputError when the split is empty."""
    records = annotations.part(split)
    if not records:
        raise InputError(f"The {split} split of the caption file(s) is empty: check --split-scheme.")
    return records


def split_report(annotations, split: str, match, describe, refusal: str, log=print):
    """`split`'s records matched by `match`, logged as "{split}: {describe(stats)}", refused when empty.

    match(records) -> what was found: a PairSet-like object with a `stats` dict and a length (pairs or
    images); describe(stats) -> str; refusal: the InputError sentence when the length is 0. Returns the
    match. An empty split is refused before matching (split_records)."""
    matched = match(split_records(annotations, split))
    log(f"{split}: {describe(matched.stats)}")
    if not len(matched):
        raise InputError(refusal)
    return matched


def example(stats: dict) -> str:
    """' (e.g. PATH)' naming the first image that was not found (stats["missing_examples"]), or ''."""
    return f" (e.g. {stats['missing_examples'][0]})" if stats.get("missing_examples") else ""


def pairs_summary(stats: dict, missing: str, max_words: int | None, bad_image: bool = True) -> str:
    """The log text of a PairSet's stats (data.pipeline.match_pairs): pairs, images, and the captions
    skipped because their image is `missing` ("not in the store"), failed extraction (when `bad_image`), or
    is longer than --max-caption-length `max_words`."""
    s = stats
    return (f"{s['pairs']} (image, caption) pairs from {s['images']} images; skipped {s['missing_image']} "
            f"captions whose image is {missing}{example(s)}"
            + (f", {s['bad_image']} whose image failed extraction (/ok false)" if bad_image else "")
            + (f", {s['too_long']} longer than --max-caption-length {max_words} (longest: "
               f"{s['longest_skipped']} tokens)" if s["too_long"] else ""))
