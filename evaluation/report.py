"""The HTML error-analysis report of `evaluate --report`: one self-contained page (thumbnails embedded as
base64 JPEG, inline CSS, no external links) with the corpus metrics at the top and every image below, worst
per-image CIDEr first, showing its generated caption and its reference captions. For an attention model
the first MAX_STRIPS images shown (the worst) also get the heat-map strip of their caption under them (drawn
by the caller, decoder.infer.heatmaps; embedded as JPEG like the thumbnails). All text is HTML-escaped.
The page carries base.outputs.REPORT_MARKER (a generator meta tag): a rerun replaces only a page of ours.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from base.atomic import atomic_write_text
from base.outputs import REPORT_MARKER
from evaluation.metrics import DISPLAY_NAMES, MetricsResult, metrics_footer, metrics_rows

THUMBNAIL_PX = 160  # longest side of the embedded thumbnails, in pixels
MAX_STRIPS = 100  # heat-map strips embedded at most (the worst images'); ~30-40 KB each for a photo
_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table.metrics{border-collapse:collapse;margin-bottom:.5em}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:2px 10px;text-align:left}
.item{display:flex;flex-wrap:wrap;gap:1em;border-top:1px solid #ddd;padding:.6em 0}
.strip{flex-basis:100%;overflow-x:auto}
.thumb{width:160px;min-width:160px;text-align:center}
.missing{width:156px;height:100px;border:2px dashed #c33;color:#c33;font-size:80%;display:flex;
 align-items:center;justify-content:center;word-break:break-all}
.gen{font-weight:bold;font-size:110%}
.cider{font-size:120%}.small{color:#666;font-size:85%}
ol{margin:.3em 0}
"""


@dataclass
class ReportItem:
    """One image of the report."""

    image_id: Hashable  # dataset image id, the key of MetricsResult.per_image
    caption: str  # the generated caption
    references: list[str] = field(default_factory=list)  # the reference captions
    image_path: str | Path | None = None  # image file for the thumbnail; None or unreadable -> placeholder
    # attention models: draws the heat-map strip shown under the image (called only for the images that
    # show one, see MAX_STRIPS; returning None shows none); None: no strip (Show and Tell)
    strip: Callable[[], Image.Image | None] | None = None


@dataclass
class ReportStats:
    """What write_report did."""

    path: Path  # the written HTML file
    n_items: int  # images shown
    n_missing_images: int  # images shown with a placeholder instead of a thumbnail
    n_strips: int = 0  # images shown with their attention heat-map strip

    def summary(self) -> str:
        """One line for the end of the run."""
        strips = f", {self.n_strips} with a heat-map strip" if self.n_strips else ""
        return (f"report: {self.n_items} images, {self.n_missing_images} without a thumbnail{strips}, "
                f"written to {self.path}")


def thumbnail_data_uri(image_path: str | Path | None, size: int = THUMBNAIL_PX) -> tuple[str | None, str]:
    """(data URI of a JPEG thumbnail, longest side `size` px, or None; reason when None, else "")."""
    if image_path is None:
        return None, "no image file given"
    try:
        with Image.open(image_path) as im:
            im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at reduced scale, much faster
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            uri = jpeg_data_uri(im, quality=80)
    except FileNotFoundError:
        return None, "image file not found"
    except Exception as exc:  # one unreadable image must not stop a report of thousands
        return None, f"unreadable image ({type(exc).__name__})"
    return uri, ""


def jpeg_data_uri(image: Image.Image, quality: int) -> str:
    """"data:image/jpeg;base64,..." of an RGB PIL image (JPEG of that quality)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _as_item(item: ReportItem | Mapping) -> ReportItem:
    if isinstance(item, ReportItem):
        return item
    return ReportItem(image_id=item["image_id"], caption=item["caption"],
                      references=list(item.get("references", [])), image_path=item.get("image_path"),
                      strip=item.get("strip"))


def _cider_key(metrics: MetricsResult, item: ReportItem) -> tuple[bool, float]:
    """Sort key: scored images by CIDEr ascending (worst first), unscored or NaN ones last."""
    value = metrics.per_image.get(item.image_id, {}).get("CIDEr")
    if value is None or math.isnan(value):
        return True, 0.0
    return False, value


def _metrics_html(metrics: MetricsResult, extra: Mapping[str, float] | None) -> str:
    """The metrics table as HTML: the text table's rows and footer (evaluation.metrics), then the notes."""
    esc = html.escape
    body = "".join(f"<tr><td>{esc(n)}</td><td>{esc(v)}</td></tr>" for n, v in metrics_rows(metrics, extra))
    notes = "".join(f"<li>{esc(n)}</li>" for n in metrics.notes)
    return (f'<table class="metrics"><tr><th>metric</th><th>score</th></tr>{body}</table>'
            f'<p class="small">{esc(metrics_footer(metrics))}</p>'
            + (f'<ul class="small">{notes}</ul>' if notes else ""))


def _item_html(rank: int, item: ReportItem, scores: Mapping[str, float], uri: str | None, why: str,
               strip_uri: str | None = None) -> str:
    esc = html.escape
    if uri:
        thumb = f'<img src="{uri}" alt="image {esc(str(item.image_id))}">'
    else:
        thumb = f'<div class="missing">{esc(why)}</div>'
    cider = scores.get("CIDEr")
    cider_text = "not scored" if cider is None else f"{cider:.3f}"
    others = ", ".join(f"{DISPLAY_NAMES.get(k, k)} {v:.3f}" for k, v in scores.items() if k != "CIDEr")
    refs = "".join(f"<li>{esc(r)}</li>" for r in item.references)
    path = "" if item.image_path is None else f" · {esc(str(item.image_path))}"
    return (f'<div class="item" id="rank{rank}"><div class="thumb">{thumb}</div><div>'
            f'<div class="small">#{rank} · image {esc(str(item.image_id))}{path}</div>'
            f'<div class="cider">CIDEr {esc(cider_text)}</div>'
            f'<div class="small">{esc(others)}</div>'
            f'<div class="gen">{esc(item.caption)}</div><ol>{refs}</ol></div>'
            + (f'<div class="strip"><img src="{strip_uri}" alt="attention of each word"></div>' if strip_uri
               else "") + "</div>")


def _strip_uri(item: ReportItem) -> str | None:
    """The item's heat-map strip as a JPEG data URI (quality 85: the words stay legible), or None."""
    image = item.strip() if item.strip is not None else None
    return None if image is None else jpeg_data_uri(image, quality=85)


def _strips_note(ordered: list[ReportItem], max_strips: int) -> str:
    """One line under the images heading when some images' heat-map strips were left out, else ""."""
    with_strip = sum(it.strip is not None for it in ordered)
    if with_strip <= max_strips:
        return ""
    return (f'<p class="small">Heat-map strips of the attention weights are shown for the first {max_strips} '
            f"images only (of {with_strip}), to keep the page small.</p>")


def write_report(path: str | Path, items: Sequence[ReportItem | Mapping], metrics: MetricsResult, *,
                 extra: Mapping[str, float] | None = None, title: str = "Caption report",
                 max_strips: int = MAX_STRIPS) -> ReportStats:
    """Write the self-contained HTML report atomically.

    items: ReportItem or dicts {"image_id", "caption", "references", "image_path", "strip"}; sorted by
    metrics.per_image[image_id]["CIDEr"] ascending (worst first; unscored last). extra: rows shown above the
    caption metrics (e.g. {"perplexity": 11.2}). A missing or unreadable image gets a placeholder. Items with
    a `strip` (attention models) show it under the image, for the first `max_strips` images shown.
    """
    ordered = sorted((_as_item(i) for i in items), key=lambda it: _cider_key(metrics, it))
    parts, missing, strips = [], 0, 0
    for rank, item in enumerate(tqdm(ordered, desc="report", unit="img", leave=False,
                                     disable=len(ordered) < 200), start=1):
        uri, why = thumbnail_data_uri(item.image_path)
        missing += uri is None
        strip_uri = _strip_uri(item) if strips < max_strips else None
        strips += strip_uri is not None
        parts.append(_item_html(rank, item, metrics.per_image.get(item.image_id, {}), uri, why, strip_uri))
    title = html.escape(title)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}'
            f"<title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>"
            f"{_metrics_html(metrics, extra)}<h2>Images, worst CIDEr first</h2>\n"
            f"{_strips_note(ordered, max_strips)}"
            + "\n".join(parts) + "\n</body></html>\n")
    out = atomic_write_text(path, page)
    return ReportStats(path=out, n_items=len(ordered), n_missing_images=missing, n_strips=strips)
