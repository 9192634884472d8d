"""Every registered model family passes the family contract on a small random checkpoint of its own class."""

from __future__ import annotations

import pytest

from efficientllava.errors import ModelLoadError
from efficientllava.families import family_for, family_names
from efficientllava.testing.family_contract import FamilyContract
from efficientllava.testing.tiny_families import TINY_BUILDERS


class TestLlava(FamilyContract):
    model_type = "llava"


class TestLlavaNext(FamilyContract):
    model_type = "llava_next"


class TestLlavaOnevision(FamilyContract):
    model_type = "llava_onevision"


class TestQwen2VL(FamilyContract):
    model_type = "qwen2_vl"


class TestQwen25VL(FamilyContract):
    model_type = "qwen2_5_vl"


def test_every_registered_family_runs_the_contract():
    tested = {cls.model_type for cls in FamilyContract.__subclasses__()}
    assert tested == set(family_names()) == set(TINY_BUILDERS)


def test_unsupported_model_type_is_one_line_listing_the_supported_ones():
    with pytest.raises(ModelLoadError) as excinfo:
        family_for("bert")
    msg = str(excinfo.value)
    assert "\n" not in msg and "'bert'" in msg
    assert all(name in msg for name in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"))
