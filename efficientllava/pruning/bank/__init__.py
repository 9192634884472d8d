"""Variant banks: every (unit, level) of a search space prepared once, swapped into the model per trial.

Two formats, chosen by the method: a nested-mask bank (one uint8 level index per weight) for methods
whose masks nest across levels, and a compact bank (bitmask + kept values per level, built lazily)
for the others. Both expose the `VariantBank` protocol the Materializer and the SRM penalty use.
"""

from efficientllava.pruning.bank.base import (
    MANIFEST,
    PRELOAD_BYTES,
    BankSpec,
    DamagedBankError,
    VariantBank,
    bank_bytes,
)
from efficientllava.pruning.bank.build import (
    bank_format,
    build_bank,
    fingerprint_for,
    open_bank,
    open_or_build,
)
from efficientllava.pruning.bank.compact import CompactBank
from efficientllava.pruning.bank.nested import NestedMaskBank

__all__ = [
    "MANIFEST",
    "PRELOAD_BYTES",
    "BankSpec",
    "CompactBank",
    "DamagedBankError",
    "NestedMaskBank",
    "VariantBank",
    "bank_bytes",
    "bank_format",
    "build_bank",
    "fingerprint_for",
    "open_bank",
    "open_or_build",
]
