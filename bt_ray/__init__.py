"""bt-ray: train, evaluate, attack and serve language models that can backtrack with [RESET]."""

__version__ = "0.1.0"
