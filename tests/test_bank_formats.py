"""Bank formats: nested-mask size and masks, compact lazy SparseGPT, damage handling, fingerprints, sharing."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os

import pytest
import torch

from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import (
    BankSpec,
    CompactBank,
    DamagedBankError,
    NestedMaskBank,
    build_bank,
    fingerprint_for,
    open_bank,
    open_or_build,
)
from efficientllava.pruning.bank.compact import pack_mask, pack_mask_torch, unpack_mask, unpack_mask_torch
from efficientllava.pruning.bank.nested import keep_where, keep_where_torch
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.methods import get_method, prune_prepared
from efficientllava.pruning.patterns import Pattern

LEVELS16 = tuple(round(0.05 * i, 2) for i in range(17))  # 0 and 16 non-zero levels, as the 7B space
UNITS = ("layer.0", "layer.1")


def _spec(method: str, levels=LEVELS16, pattern: str = "unstructured", **options) -> BankSpec:
    return BankSpec("layer", tuple((u, levels) for u in UNITS), method, pattern, options or None)


@pytest.fixture()
def model(small_model):
    return copy.deepcopy(small_model[0])


def _linears(bank) -> list[str]:
    return [n for u in UNITS for n in bank.unit_linears[u]]


def _dense_bytes(model, names) -> int:
    return sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names)


def _dense(model, names) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def _prepared(model, batches, method, names) -> dict[str, dict[str, torch.Tensor]]:
    if method.stats == "none":
        return {n: {} for n in names}
    stats = collect_stats(model, batches, names, need_hessian=method.stats == "hessian")
    return {n: method.prepare(stats[n]) for n in names}


def test_pack_mask_round_trip_and_torch_twins():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.numel()).view(7, 13), mask)
    # the torch versions (used on GPUs) give the same bytes and bits
    assert torch.equal(pack_mask_torch(mask.reshape(-1)), packed)
    assert torch.equal(unpack_mask_torch(packed, mask.numel()), mask.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_where_paths_agree_bit_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 24, generator=g).to(dtype)
    index = torch.randint(0, 5, (16, 24), generator=g, dtype=torch.uint8)
    want = torch.where(index >= 3, dense, torch.zeros((), dtype=dtype))
    for fn in (keep_where, keep_where_torch):
        out = torch.full_like(dense, 7.0)
        fn(out, dense, index, 3)
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), fn  # bits, so +0.0 not -0.0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "obs_mask"])
def test_nested_bank_holds_16_levels_in_one_byte_per_weight(model, small_batches, tmp_path, method):
    bank = build_bank(model, small_batches, _spec(method), tmp_path / "bank")
    assert isinstance(bank, NestedMaskBank)
    names = _linears(bank)
    numel = sum(model.get_submodule(n).weight.numel() for n in names)
    sizes = bank.nbytes()
    headers = 1024 * len(UNITS)  # safetensors headers: one small JSON per unit file
    assert numel <= sizes["variants"] <= numel + headers
    assert sizes["variants"] <= 1.0 * _dense_bytes(model, names) * 0.5  # fp32 weights: 0.25x, bf16 would be 0.5x
    assert "calibration" not in sizes
    # Every level's norm is known without materialising anything.
    assert len(bank.pruned_norms) == len(names) * 16
    # Each stored level is exactly the method's own mask, and kept weights are the dense ones.
    m = get_method(method)
    calib = _prepared(model, small_batches, m, names)
    dense = _dense(model, names)
    for unit in UNITS:
        for level in (0.05, 0.4, 0.8):
            got = bank.variant(unit, level, dense)
            for n, w in got.items():
                want = prune_prepared(m, dense[n], calib[n], level, Pattern())
                assert torch.equal(got[n], want), (n, level)
                assert float((dense[n] * (w != 0)).norm()) == pytest.approx(bank.norm(n, level), rel=1e-6)


def test_nested_bank_keeps_nm_patterns(model, small_batches, tmp_path):
    bank = build_bank(model, small_batches, _spec("wanda", (0.0, 0.5), "2:4"), tmp_path / "bank")
    mat = Materializer(model, bank)
    with mat.applied(PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.5})):
        for n in _linears(bank):
            groups = (model.get_submodule(n).weight == 0).reshape(-1, 4).sum(1)
            assert (groups == 2).all(), n


def test_compact_sparsegpt_bank_is_lazy_exact_and_small(model, small_batches, tmp_path):
    spec = _spec("sparsegpt", blocksize=32)
    bank = build_bank(model, small_batches, spec, tmp_path / "bank")
    assert isinstance(bank, CompactBank)
    names = _linears(bank)
    before = bank.nbytes()
    assert before.get("variants", 0) == 0 and before["calibration"] > 0  # nothing pruned yet
    dense = _dense(model, names)
    mat = Materializer(model, bank)
    policy = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.0})
    assert not bank.pruned_norms
    mat.prepare(policy)  # builds layer.0 @ 0.5 and makes its norms known, without touching the model
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in dense.items())
    assert {lv for (_, lv) in bank.pruned_norms} == {0.5}
    assert bank.is_built("layer.0", 0.5) and not bank.is_built("layer.1", 0.5)
    # The variant is exactly SparseGPT's output from the same calibration.
    m = spec.pruning_method
    calib = _prepared(model, small_batches, m, names)
    with mat.applied(policy):
        for n in bank.unit_linears["layer.0"]:
            want = prune_prepared(m, dense[n], calib[n], 0.5, Pattern())
            assert torch.equal(model.get_submodule(n).weight, want), n
    # Another process (here: a second opening) sees the built variant and its norms.
    again = open_bank(bank.root)
    assert set(again.pruned_norms) == set(bank.pruned_norms)
    # Building every level drops each layer's calibration state; the complete bank is >= 35% below
    # the dense-layout bank of the same levels (16 x the dense linear bytes), counting every file.
    for unit in UNITS:
        for level in LEVELS16[1:]:
            mat.prepare(PruningPolicy.from_mapping({unit: level}))
    sizes = bank.nbytes()
    assert "calibration" not in sizes
    dense_layout = 16 * _dense_bytes(model, names)
    assert sizes["total"] <= 0.65 * dense_layout, (sizes, dense_layout)
    eager = build_bank(model, small_batches, spec, tmp_path / "eager", eager=True)
    assert eager.nbytes()["variants"] == sizes["variants"]
    with Materializer(model, eager).applied(policy):
        for n in bank.unit_linears["layer.0"]:
            assert torch.equal(model.get_submodule(n).weight, prune_prepared(m, dense[n], calib[n], 0.5, Pattern()))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_damaged_banks_raise_one_error_and_are_rebuilt(model, small_batches, tmp_path, method):
    spec = _spec(method, (0.0, 0.5))
    bank = open_or_build(model, small_batches, spec, tmp_path, source="m", calibration="c")
    root = bank.root
    assert root.name == fingerprint_for(model, spec, "m", "c")
    data_file = next(p for p in root.rglob("*.safetensors"))
    _truncate(data_file)
    with pytest.raises(DamagedBankError, match="rebuild"):
        open_bank(root)
    rebuilt = open_or_build(model, small_batches, spec, tmp_path, source="m", calibration="c")
    assert rebuilt.root == root and open_bank(root).fingerprint == bank.fingerprint
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedBankError, match="v2"):
        open_bank(root)
    del manifest["streams" if method == "sparsegpt" else "files"]
    manifest["version"] -= 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedBankError, match="malformed"):
        open_bank(root)
    (root / "manifest.json").write_text("{ truncated")
    with pytest.raises(DamagedBankError):
        open_bank(root)
    (root / "manifest.json").unlink()
    with pytest.raises(DamagedBankError, match="not a complete variant bank"):
        open_bank(root)
    assert open_or_build(model, small_batches, spec, tmp_path, source="m", calibration="c").root == root
    assert not list(tmp_path.glob("*.partial-*"))


def test_lazy_variant_damaged_after_calibration_is_gone(model, small_batches, tmp_path):
    bank = build_bank(model, small_batches, _spec("sparsegpt", (0.0, 0.5)), tmp_path / "bank")
    mat = Materializer(model, bank)
    mat.prepare(PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.5}))
    assert not list((bank.root / "calib").glob("*.safetensors"))  # every variant built: calibration dropped
    (bank.root / "levels" / "layer.1" / "0.5000.safetensors").unlink()
    with pytest.raises(DamagedBankError, match="calibration"):
        open_bank(bank.root)


def test_fingerprint_names_everything_the_bank_depends_on(model):
    base = fingerprint_for(model, _spec("sparsegpt"), "ckpt", "fewshot/projector-0")
    variants = [
        fingerprint_for(model, _spec("sparsegpt", percdamp=0.02), "ckpt", "fewshot/projector-0"),
        fingerprint_for(model, _spec("sparsegpt", (0.0, 0.5)), "ckpt", "fewshot/projector-0"),
        fingerprint_for(model, _spec("sparsegpt", (0.0, 0.5), "2:4"), "ckpt", "fewshot/projector-0"),
        fingerprint_for(model, _spec("obs_mask"), "ckpt", "fewshot/projector-0"),
        fingerprint_for(model, _spec("sparsegpt"), "other", "fewshot/projector-0"),
        fingerprint_for(model, _spec("sparsegpt"), "ckpt", "fewshot/projector-1"),
        fingerprint_for(copy.deepcopy(model).to(torch.bfloat16), _spec("sparsegpt"), "ckpt", "fewshot/projector-0"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Magnitude needs no calibration: its bank survives projector updates.
    assert fingerprint_for(model, _spec("magnitude"), "ckpt", "a") == fingerprint_for(model, _spec("magnitude"), "ckpt", "b")


# -- several worker processes on one node --------------------------------------------------------------


def _bank_mappings(root: str) -> dict[str, int]:
    """Sum of this process's smaps fields over mappings of files under `root` (kB)."""
    out = {"Rss": 0, "Shared_Clean": 0, "Shared_Dirty": 0, "Anonymous": 0}
    where = ""
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                where = " ".join(head[5:])
            elif where.startswith(root) and head[0].rstrip(":") in out:
                out[head[0].rstrip(":")] += int(head[1])
                if head[0] == "Anonymous:" and int(head[1]):
                    print("anonymous pages in", where, line, flush=True)
    return out


def _worker(banks_dir: str, barrier, queue) -> None:
    """One trial worker: open (or build) the shared bank, apply every policy, report what it mapped."""
    torch.set_num_threads(1)
    from efficientllava.data.synthetic import make_synthetic
    from efficientllava.models.tiny import TinyConfig, build_tiny
    from efficientllava.prompting import COMPACT, encode_batches

    model, processor = build_tiny(TinyConfig(text_layers=2, text_hidden=64, text_intermediate=128, vision_layers=1))
    model.eval()
    batches = encode_batches(processor, make_synthetic(16, 0, "train"), 8, COMPACT)
    barrier.wait()  # both ask for the bank at once
    bank = open_or_build(model, batches, _spec("sparsegpt", (0.0, 0.3, 0.5)), banks_dir, source="tiny",
                         calibration="c")
    mat = Materializer(model, bank)
    for level in (0.3, 0.5):  # both workers race to build the same lazy variants
        with mat.applied(PruningPolicy.from_mapping({u: level for u in UNITS})):
            pass
    data = {k: v.clone() for k, v in mat.weights.items()}
    with mat.applied(PruningPolicy.from_mapping({u: 0.5 for u in UNITS})):
        pruned = {k: v.clone() for k, v in mat.weights.items()}
    # What every swap of a bank too big to preload reads: the variant files' memory-mapped views. Hold
    # them all, so both workers map every page at once.
    held = [bank._variant(u, lv, torch.device("cpu")) for u in UNITS for lv in (0.3, 0.5)]
    assert sum(t.numel() for h in held for t in h.values()) > 0
    barrier.wait()  # both hold their mappings now
    queue.put((os.getpid(), str(bank.root), _bank_mappings(str(bank.root)), bank.nbytes(),
               {k: v.sum().item() for k, v in pruned.items()}, all(torch.equal(data[k], v) for k, v in mat.weights.items())))
    barrier.wait()


@pytest.mark.slow  # two spawned processes, each loading torch and a model (~20 s on 2 cores)
def test_workers_on_a_node_build_once_and_share_one_copy(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, root_a, maps_a, sizes_a, sums_a, restored_a), (_, root_b, maps_b, _, sums_b, restored_b) = results
    assert root_a == root_b and restored_a and restored_b
    assert sums_a == sums_b  # the same variants, built once
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    assert not list(tmp_path.rglob("*.tmp-*")) and not list(tmp_path.glob("*.partial-*"))
    variant_kb = sizes_a["variants"] / 1024
    for maps in (maps_a, maps_b):
        assert maps["Anonymous"] == 0  # no copy-on-write copy of a bank page in either worker
        assert maps["Rss"] >= 0.9 * variant_kb  # the variants are served from the file mapping, not copied
        # ... and those page-cache pages are mapped by both workers (smaps' Shared_* counts pages mapped
        # by more than one process; Dirty only means not yet written back to disk)
        assert maps["Shared_Clean"] + maps["Shared_Dirty"] >= 0.9 * variant_kb
