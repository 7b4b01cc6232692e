"""Shared code of the chest X-ray ViT: image loading, models, training pieces, metrics and the model card."""
