"""The Show and Tell decoder: configs, model, the shared training loop, model-dir save/load, imports."""
