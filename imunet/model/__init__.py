"""PyTorch models: the shared encoder, the implicit decoder, and the dense U-Net baseline."""

from .decoder import ImplicitDecoder, gather_features, positional_encoding
from .encoder import Encoder
from .network import ImplicitUNet, count_parameters
from .unet import UNet

__all__ = [
    "Encoder",
    "ImplicitDecoder",
    "gather_features",
    "positional_encoding",
    "ImplicitUNet",
    "UNet",
    "count_parameters",
]
