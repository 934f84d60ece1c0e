"""Inference: features for a model dir (features.py: store rows or image files, CNN fingerprint-checked),
captions (captioner.py, beam search over the decoder), evaluate (evaluate.py) and the SavedModel export
(export.py, with export_decode.py: image bytes decoded in the graph as extract decodes them)."""
