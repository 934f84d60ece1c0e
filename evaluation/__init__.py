"""Scoring generated captions against references: COCO metrics, CIDEr-D, the HTML report, the shapes-set
accuracy check (no model code)."""
