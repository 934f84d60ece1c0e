"""The bottom layer every package stands on: errors (`InputError`), atomic writes, locks, and the machine as
TensorFlow sees it (devices, strategy, precision, quiet start-up). It imports nothing else of ours."""
