"""flm: train language models on a budget by growing them, as FLM-101B did."""

__version__ = "0.1.0"
