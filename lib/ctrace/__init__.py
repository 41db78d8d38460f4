"""ctrace: causal circuit tracing in single-cell foundation models."""

__version__ = "0.1.0"
