"""The Show and Tell decoder and what runs it: config.py + model.py (the network), modeldir.py (the one
model-dir writer/reader), train/ (the one training loop and a module per training command), infer/ (the one
inference feature source, caption, evaluate, export), demo.py, im2txt_import.py."""
