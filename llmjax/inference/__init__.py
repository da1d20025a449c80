"""Generating text from a model: the same modules and weights as training, never the trainer.

    sampling.py  a plain sampling loop over a fixed buffer (the sample printed after training)

This package imports nothing from llmjax.training (an import-linter contract checks it):
a command restores a model (llmjax.training.restore) and hands it here.
"""
