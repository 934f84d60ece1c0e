"""Training: THE loop (loop.py) and what it is made of (optimizers, checkpoints, metrics log, tf.distribute
roles), plus one module per training command: train_decoder.py (from cached features), finetune.py (CNN +
decoder from images, with image_batches.py) and scst.py (self-critical, CIDEr-D reward); split_report.py is
the step they share: a caption split matched with its images, logged, refused when empty."""
