"""Test doubles and contract suites for plug-ins (like `optuna.testing`): not used by a search itself.

- `family_contract.py`: `FamilyContract`, the tests every registered model family passes;
- `tiny_families.py`: small random-weight checkpoints of every family, built offline;
- `pruning_methods.py`: `PruningMethodContract`, the tests every registered pruning method passes;
- `toy.py`: `QuadraticProblem`, a SearchProblem without a model (fast searches in tests, overhead benchmark);
- `contract.py`: `SearchProblemContract`, the tests every SearchProblem passes.
"""
