"""apollo-train: online, in-place fine-tuning of the model vLLM is serving."""

__version__ = "0.1.0"
