"""influence-index: EK-FAC-preconditioned gradient-sketch indexes of an LM's training corpus."""

__version__ = "0.1.0"
