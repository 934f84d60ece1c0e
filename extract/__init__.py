"""Image decoding and preprocessing, the InceptionV3 encoder, and the feature-extraction run."""
