"""Model definitions in plain torch: the Llama decoder and the BERT-style sentence encoder."""

from __future__ import annotations

from edgeforge.errors import UnknownNameError


def model_class(architecture: str):
    """The nn.Module class for an architecture name ("llama", "bert")."""
    if architecture == "llama":
        from edgeforge.models.llama import Transformer

        return Transformer
    if architecture == "bert":
        from edgeforge.models.encoder import BertEncoder

        return BertEncoder
    raise UnknownNameError("architecture", architecture, ["llama", "bert"])
