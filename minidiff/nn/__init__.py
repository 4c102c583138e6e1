"""Networks: UNet and MLP denoisers and the embeddings they share."""

from .embeddings import (
    CONDITIONING_KEYS,
    ClassEmbedding,
    ConditioningEmbedding,
    PositionEmbedding,
    ScalarEmbedding,
    TimeEmbedding,
    VectorEmbedding,
    sinusoidal_embedding,
)
from .mlp import MLPDenoiser
from .unet import UNet

__all__ = [
    "CONDITIONING_KEYS",
    "ClassEmbedding",
    "ConditioningEmbedding",
    "MLPDenoiser",
    "PositionEmbedding",
    "ScalarEmbedding",
    "TimeEmbedding",
    "UNet",
    "VectorEmbedding",
    "sinusoidal_embedding",
]
