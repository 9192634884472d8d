"""Calibration statistics on a tiny random LLaVA: Hessians, column norms, padding, sharing, hook removal."""

from __future__ import annotations

import pytest
import torch
from helpers import random_llava

from efficientllava.errors import ConfigError, DataError
from efficientllava.pruning.calibrate import collect_stats

LAYER = "model.language_model.layers.1"
ATTN = [f"{LAYER}.self_attn.{p}_proj" for p in "qkvo"]
MLP = [f"{LAYER}.mlp.{p}_proj" for p in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def model():
    return random_llava()


def make_batches(pad_id: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two left-padded batches with 4 image tokens per sample, plus keys the model must not receive."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for pads in ([0, 3], [2, 5]):
        ids = torch.randint(5, 64, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        for row, p in enumerate(pads):
            ids[row, :p], mask[row, :p] = pad_id, 0
            ids[row, p + 1 : p + 5] = 3  # the image tokens
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "answer_pos": ids[:, 0]}
        )
    return batches


def test_hessian_and_norms_match_hand_computation(model):
    batches, captured = make_batches(), []
    q = model.get_submodule(ATTN[0])
    handle = q.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().clone()))
    try:
        stats = collect_stats(model, batches, ATTN + MLP, need_hessian=True)
    finally:
        handle.remove()
    x = torch.cat([h[b["attention_mask"] == 1] for h, b in zip(captured, batches, strict=True)]).double()
    n = sum(int(b["attention_mask"].sum()) for b in batches)
    assert x.shape[0] == n == stats[ATTN[0]].n_tokens == 48 - (3 + 2 + 5)
    torch.testing.assert_close(stats[ATTN[0]].hessian.double(), 2.0 / n * x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[ATTN[0]].col_sq_norm.double(), (x * x).sum(0), rtol=1e-5, atol=1e-6)
    assert stats[ATTN[0]].hessian.dtype == torch.float32


def test_padding_tokens_are_excluded(model):
    a = collect_stats(model, make_batches(pad_id=0), ATTN, need_hessian=True)
    b = collect_stats(model, make_batches(pad_id=17), ATTN, need_hessian=True)  # other pad content
    for name in ATTN:  # layer 1 attends across tokens: only the mask keeps pads out of these stats
        torch.testing.assert_close(a[name].hessian, b[name].hessian)
        torch.testing.assert_close(a[name].col_sq_norm, b[name].col_sq_norm)
    no_mask = [{k: v for k, v in batch.items() if k != "attention_mask"} for batch in make_batches()]
    assert collect_stats(model, no_mask, ATTN[:1], need_hessian=False)[ATTN[0]].n_tokens == 48


def test_linears_with_the_same_input_share_stats(model):
    stats = collect_stats(model, make_batches(), ATTN + MLP, need_hessian=True)
    q, k, v, o = (stats[name] for name in ATTN)
    gate, up, down = (stats[name] for name in MLP)
    assert q is k is v and q.hessian is v.hessian and gate.hessian is up.hessian
    assert len({id(s.hessian) for s in stats.values()}) == 4  # qkv, o, gate/up, down
    assert o.hessian.shape == (32, 32) and down.hessian.shape == (64, 64)
    wanda = collect_stats(model, make_batches(), MLP, need_hessian=False)
    assert all(s.hessian is None for s in wanda.values())
    torch.testing.assert_close(wanda[MLP[2]].col_sq_norm, down.col_sq_norm)


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_also_after_errors(model):
    before, ran = hook_count(model), []
    lm_head = model.lm_head.register_forward_hook(lambda *args: ran.append(1))
    collect_stats(model, make_batches(), ATTN, need_hessian=False)
    lm_head.remove()
    assert hook_count(model) == before and not ran  # hooks gone; forwards stopped after layer 1's o_proj
    bad = make_batches()
    bad[1]["pixel_values"] = torch.randn(2, 3, 7, 7)
    with pytest.raises(Exception):  # noqa: B017 - any model error; the point is the cleanup
        collect_stats(model, bad, ATTN, need_hessian=False)
    assert hook_count(model) == before


def test_bad_names_and_non_llm_linears_are_clear_errors(model):
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        collect_stats(model, make_batches(), [f"{LAYER}.mlp"], need_hessian=False)
    with pytest.raises(DataError, match="calibrate only language-model linears"):
        collect_stats(
            model, make_batches(), ["model.vision_tower.encoder.layers.0.mlp.fc1"], need_hessian=False
        )
    with pytest.raises(DataError, match="no \\(unpadded\\) tokens"):
        collect_stats(model, [], ATTN[:1], need_hessian=False)
