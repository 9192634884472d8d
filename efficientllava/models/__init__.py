"""LLaVA models: any HF checkpoint, or the built-in tiny model trained on the synthetic task."""

from efficientllava.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_dtype"]
