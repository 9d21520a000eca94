"""Models: the ViT encoder, the MAE, the classifier, and `create_model` to build them by name."""

from mae_vit.models.classifier import ViTClassifier
from mae_vit.models.mae import MaskedAutoencoderViT
from mae_vit.models.registry import create_model, model_names
from mae_vit.models.vit import SIZES, VisionTransformer

__all__ = ["MaskedAutoencoderViT", "SIZES", "ViTClassifier", "VisionTransformer", "create_model", "model_names"]
