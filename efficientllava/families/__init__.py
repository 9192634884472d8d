"""Model families (one file each, registered by `config.model_type`): see `base.ModelFamily`."""

from efficientllava.families import llava, llava_next, llava_onevision, qwen2_vl  # noqa: F401 (registration)
from efficientllava.families.base import (
    OWN_KEYS,
    ROLES,
    ModelFamily,
    TokenCounts,
    family_for,
    family_names,
    family_of,
    family_of_processor,
    model_inputs,
    register_family,
)

__all__ = ["OWN_KEYS", "ROLES", "ModelFamily", "TokenCounts", "family_for", "family_names", "family_of",
           "family_of_processor", "model_inputs", "register_family"]
