"""mae_vit: masked-autoencoder pretraining of Vision Transformers, fine-tuning and linear probing."""

__version__ = "0.1.0"
