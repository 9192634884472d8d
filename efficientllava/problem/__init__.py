"""The LLaVA-family pruning problem the search solves (`problem: efficientllava.problem:PruningProblem`).

- `session.py`: a worker's heavy state (model loaded once, variant bank, the round's scorer);
- `rounds.py`: work between and after rounds on such a worker (projector training, held-out check);
- `pruning.py`: `PruningProblem`, the `SearchProblem` the engine drives.
"""

from efficientllava.problem.pruning import PruningProblem, open_trial_session
from efficientllava.problem.session import WorkerSession, params_to_policy, resolved_space, srm_config

__all__ = ["PruningProblem", "WorkerSession", "open_trial_session", "params_to_policy", "resolved_space",
           "srm_config"]
