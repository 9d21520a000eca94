"""Models: the ViT encoder, the MAE, the classifier, and `create_model` to build them by name."""

from .classifier import ViTClassifier
from .mae import MaskedAutoencoderViT
from .registry import create_model, model_names
from .vit import SIZES, VisionTransformer

__all__ = ["MaskedAutoencoderViT", "SIZES", "ViTClassifier", "VisionTransformer", "create_model", "model_names"]
