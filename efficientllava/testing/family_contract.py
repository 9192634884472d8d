"""`FamilyContract`: the tests every registered model family passes (like transformers' ModelTesterMixin).

Subclass it in a test module with the family's `model_type` (and override `build` to use another
small checkpoint than `tiny_families.TINY_BUILDERS[model_type]`)::

    class TestQwen2VL(FamilyContract):
        model_type = "qwen2_vl"

Every check runs on a small random-weight model of the family's own transformers class and its
own processor: the registry, the decoder's prunable linears and the units over them, projector
and vision tower, prompts and option letters, the batch layout, answer logits against the full
forward, padding, open-ended batches, token counts and the cost model, calibration hooks,
gradients into the projector, and a save / `load_model` / checkpoint-key round trip.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import datasets
import pytest
import torch
from PIL import Image
from torch import nn

from efficientllava.data.schema import FEATURES
from efficientllava.families import OWN_KEYS, ROLES, ModelFamily, family_for, family_names, family_of
from efficientllava.families.base import family_of_processor
from efficientllava.families.prompts import LETTERS
from efficientllava.models.loading import load_model
from efficientllava.policy import PruningPolicy
from efficientllava.prompting import encode_answer_batches, encode_batches, model_inputs
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.units import (
    GRANULARITIES,
    PART_ROLES,
    num_decoder_layers,
    prunable_units,
    unit_names,
)
from efficientllava.scoring.accuracy import answer_logits, option_logits
from efficientllava.scoring.cost import CostModel

_SPECS = [  # (options, answer, context, colour): 2 or 4 options, contexts of different lengths (padding)
    (["red", "blue"], 1, "", (200, 40, 40)),
    (["one", "two", "three", "four"], 3, "top left", (40, 200, 60)),
    (["square", "circle"], 0, "top left bottom right nothing", (50, 80, 230)),
    (["red", "green", "blue", "yellow"], 2, "", (230, 220, 40)),
]


def mixed_dataset() -> datasets.Dataset:
    """Four schema rows with 2 or 4 options and contexts of different lengths, so batches are padded."""
    rows = [{"id": f"mixed-{i}", "image": Image.new("RGB", (32, 32), colour), "question": "what color is the shape ?",
             "context": context, "options": options, "answer": answer, "answers": [], "qtype": "color"}
            for i, (options, answer, context, colour) in enumerate(_SPECS)]
    return datasets.Dataset.from_list(rows, features=FEATURES)


class FamilyContract:
    """Contract tests of one model family; subclasses set `model_type`."""

    model_type: str

    def build(self) -> tuple[nn.Module, Any]:
        """A small random-weight model of the family's class (eval mode) and its processor."""
        from efficientllava.testing.tiny_families import TINY_BUILDERS

        return TINY_BUILDERS[self.model_type]()

    # -- fixtures ------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def built(cls) -> tuple[nn.Module, Any]:
        model, processor = cls().build()
        return model.eval(), processor

    @pytest.fixture(scope="class")
    @classmethod
    def family(cls) -> ModelFamily:
        return family_for(cls.model_type)

    @pytest.fixture(scope="class")
    @classmethod
    def fmt(cls, family: ModelFamily) -> str:
        return family.default_prompt_format

    @pytest.fixture(scope="class")
    @classmethod
    def batches(cls, built: tuple[nn.Module, Any], fmt: str) -> list[dict[str, torch.Tensor]]:
        return encode_batches(built[1], mixed_dataset(), 4, fmt)

    # -- registry and modules ----------------------------------------------------------------------

    def test_registered(self, built, family):
        model, processor = built
        assert self.model_type in family_names()
        assert family_of(model) is family and family.model_type == self.model_type
        assert family_of_processor(processor) is family
        assert isinstance(model, family.model_class())
        assert type(processor).__name__ == family.processor_class_name

    def test_decoder_layers_and_their_linears(self, built, family):
        model = built[0]
        layers = family.decoder_layers(model)
        assert len(layers) == family.num_layers(model.config) == num_decoder_layers(model) >= 1
        seen: set[int] = set()
        for i, layer in enumerate(layers):
            inside = {id(m) for m in layer.modules()}
            linears = family.layer_linears(i)
            assert list(linears) == list(ROLES)
            for name in linears.values():
                module = model.get_submodule(name)
                assert isinstance(module, nn.Linear) and id(module) in inside, name
                seen.add(id(module))
        assert len(seen) == len(ROLES) * len(layers)  # 7 distinct matrices per layer

    @pytest.mark.parametrize("granularity", GRANULARITIES)
    def test_units_cover_every_linear_once(self, built, family, granularity):
        model = built[0]
        units = prunable_units(model, granularity)
        n = num_decoder_layers(model)
        assert [u.name for u in units] == unit_names(n, granularity)
        covered = [name for u in units for name in u.linears]
        every = [name for i in range(n) for name in family.layer_linears(i).values()]
        assert sorted(covered) == sorted(every) and len(set(covered)) == len(covered)
        for u in units:
            assert u.linears == tuple(family.layer_linears(u.layer)[r] for r in PART_ROLES[u.part])

    def test_projector_and_vision_tower(self, built, family):
        model = built[0]
        projector, vision = family.projector(model), family.vision_tower(model)
        decoder = {id(p) for p in family.decoder_layers(model).parameters()}
        assert any(True for _ in projector.parameters()) and any(True for _ in vision.parameters())
        assert not decoder & {id(p) for p in projector.parameters()}
        assert not decoder & {id(p) for p in vision.parameters()}
        assert family.lm_head(model).weight.shape[0] == model.config.get_text_config().vocab_size

    # -- prompts and batches ----------------------------------------------------------------------

    def test_prompts(self, built, family, fmt):
        processor = built[1]
        assert fmt in family.prompt_formats
        mc = family.prompt(processor, fmt, "what color is the shape ?", ["red", "blue"], "")
        assert "red" in mc and "blue" in mc and "what color is the shape ?" in mc
        open_ended = family.prompt(processor, fmt, "what color is the shape ?", [], "")
        assert "red" not in open_ended and "what color is the shape ?" in open_ended
        ids = family.letter_token_ids(processor, fmt, 4)
        assert len(set(ids)) == 4
        assert [processor.tokenizer.decode([i]).strip() for i in ids] == list(LETTERS[:4])

    def test_batch_layout(self, built, family, batches):
        model, processor = built
        data = mixed_dataset()
        forward = set(inspect.signature(model.forward).parameters)
        image_id = family.image_token_id(model.config)
        row = 0
        for batch in batches:
            assert set(batch) - set(OWN_KEYS) >= set(family.forward_inputs)
            assert set(model_inputs(batch)) <= forward, set(model_inputs(batch)) - forward
            assert set(batch) & OWN_KEYS == {"answer_pos", "option_ids", "labels", "answers"}
            ids, mask = batch["input_ids"], batch["attention_mask"]
            lengths = mask.sum(1)
            for i in range(len(ids)):
                n = int(lengths[i])
                assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
                assert int(batch["answer_pos"][i]) == n - 1
                assert int((ids[i] == image_id).sum()) > 0  # the image placeholder was expanded
                options, answer = data[row]["options"], data[row]["answer"]
                assert (batch["option_ids"][i] >= 0).sum() == len(options)
                assert int(batch["labels"][i]) == int(batch["option_ids"][i, answer])
                row += 1
        assert row == len(data)
        assert any(int(b["attention_mask"].sum(1).min()) < b["attention_mask"].shape[1] for b in batches)

    @torch.no_grad()
    def test_answer_logits_are_the_full_forward_at_the_answer(self, built, batches):
        model = built[0]
        for batch in batches:
            full = model(**model_inputs(batch)).logits
            want = full[torch.arange(full.shape[0]), batch["answer_pos"]]
            torch.testing.assert_close(answer_logits(model, batch), want, atol=1e-5, rtol=1e-5)

    @torch.no_grad()
    def test_padding_does_not_change_option_logits(self, built, fmt, batches):
        model, processor = built
        single = encode_batches(processor, mixed_dataset(), 1, fmt)
        together = torch.cat([option_logits(model, b) for b in batches])
        alone = torch.cat([option_logits(model, b) for b in single])
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)

    def test_open_ended_batches(self, built, family, fmt):
        model, processor = built
        data = mixed_dataset()
        prompts = [family.prompt(processor, fmt, q, [], c) for q, c in zip(data["question"], data["context"],
                                                                          strict=True)]
        answers = [o[a] for o, a in zip(data["options"], data["answer"], strict=True)]
        eos = processor.tokenizer.eos_token_id
        for batch in encode_answer_batches(processor, data["image"], prompts, answers, 2):
            assert set(batch) & OWN_KEYS == {"answer_pos", "answer_ids"}
            for i in range(batch["input_ids"].shape[0]):
                target = [t for t in batch["answer_ids"][i].tolist() if t != -100]
                assert target[-1] == eos and len(target) >= 2
                start = int(batch["answer_pos"][i]) + 1  # position answer_pos + j predicts answer_ids[j]
                assert batch["input_ids"][i, start : start + len(target) - 1].tolist() == target[:-1]
                assert int(batch["attention_mask"][i].sum()) == start + len(target) - 1
            with torch.no_grad():
                model(**model_inputs(batch))

    # -- cost, calibration, training ----------------------------------------------------------------

    def test_token_counts_and_cost(self, built, family, batches):
        model = built[0]
        counts = family.token_counts(model, batches)
        n = sum(int(b["input_ids"].shape[0]) for b in batches)
        image_id = family.image_token_id(model.config)
        assert counts.image_tokens == sum(int((b["input_ids"] == image_id).sum()) for b in batches) / n
        assert counts.tokens == sum(int(b["attention_mask"].sum()) for b in batches) / n
        assert counts.image_tokens > 0 and counts.vision_attention >= counts.vision_tokens > 0
        cost_model = CostModel.from_batches(model, "matrix", batches)
        assert cost_model.image_tokens == counts.image_tokens
        expected = {u.name: sum(model.get_submodule(n).weight.numel() for n in u.linears)
                    for u in prunable_units(model, "matrix")}
        assert cost_model.unit_param_counts() == expected
        half = cost_model.cost(PruningPolicy.uniform(cost_model.unit_names, 0.5))
        assert half.kept_fraction == 0.5 and half.flops_speedup > 1.0
        assert cost_model.projector_params > 0 and cost_model.vision_params > 0

    def test_calibration_sees_the_llm_tokens(self, built, family, batches):
        model = built[0]
        linears = family.layer_linears(0)
        stats = collect_stats(model, batches, list(linears.values()), need_hessian=True)
        assert stats[linears["q"]].n_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
        assert stats[linears["q"]] is stats[linears["k"]] is stats[linears["v"]]  # one input, one Hessian
        assert stats[linears["gate"]] is stats[linears["up"]]
        assert stats[linears["o"]] is not stats[linears["q"]]

    def test_projector_gets_the_answer_gradient(self, built, family, batches):
        model = built[0]
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(answer_logits(model, batches[0]).float(), batches[0]["labels"])
        loss.backward()
        grads = [p.grad for p in family.projector(model).parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
        model.zero_grad(set_to_none=True)

    # -- save and load -------------------------------------------------------------------------------

    def test_save_load_round_trip(self, built, family, fmt, batches, tmp_path_factory):
        from safetensors import safe_open

        model, processor = built
        path = tmp_path_factory.mktemp(self.model_type) / "ckpt"
        model.save_pretrained(path)
        processor.save_pretrained(path)
        assert json.loads((path / "config.json").read_text())["model_type"] == self.model_type
        keys: dict[str, Any] = {}
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as fh:
                keys.update({k: file for k in fh.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        for unit in prunable_units(model, "matrix"):
            (name,) = unit.linears
            key = family.checkpoint_key(name, set(keys))
            with safe_open(str(keys[key]), framework="pt") as fh:
                assert torch.equal(fh.get_tensor(key), model.get_submodule(name).weight), name
        loaded = load_model(str(path), device="cpu")
        assert loaded.family is family and type(loaded.model) is family.model_class()
        assert loaded.prompt_format == fmt == family.default_prompt_format
        again = encode_batches(loaded.processor, mixed_dataset(), 4, loaded.prompt_format, family=loaded.family)
        with torch.no_grad():
            for a, b in zip(batches, again, strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                torch.testing.assert_close(option_logits(loaded.model, b), option_logits(model, a))
