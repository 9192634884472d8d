"""Test doubles and contract suites for plug-ins (like `optuna.testing`): not used by a search itself.

- `toy.py`: `QuadraticProblem`, a SearchProblem without a model (fast searches in tests, overhead benchmark);
- `contract.py`: `SearchProblemContract`, the tests every SearchProblem passes.
"""
