"""Model definitions in plain torch: the Llama decoder and the BERT-style sentence encoder, and the registered
architecture objects (:mod:`edgeforge.models.architecture`) that describe them to the other stages."""

from __future__ import annotations

from edgeforge.models.architecture import ARCHITECTURES, Architecture


def architecture(name: str) -> Architecture:
    """The registered architecture called ``name`` ("llama", "bert", or a plugin's); UnknownNameError lists them."""
    return ARCHITECTURES.get(name)


def model_class(name: str):
    """The nn.Module class for an architecture name."""
    return architecture(name).model_class
