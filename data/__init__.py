"""Captions, splits, tokenizer, vocabulary, the HDF5 feature store, tf.data pipelines, synthetic demo data."""
