"""Networks: UNet and MLP denoisers, DDGAN's discriminators and the embeddings they share."""

from .discriminator import ConvDiscriminator, MLPDiscriminator
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
    "ConvDiscriminator",
    "MLPDenoiser",
    "MLPDiscriminator",
    "PositionEmbedding",
    "ScalarEmbedding",
    "TimeEmbedding",
    "UNet",
    "VectorEmbedding",
    "sinusoidal_embedding",
]
