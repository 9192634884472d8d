"""EfficientLLaVA: generalisation-aware auto-pruning of LLaVA-style VLMs."""


def load_trials(path):
    """The trial table of an experiment directory as a pandas DataFrame (see `efficientllava.trials`)."""
    from efficientllava.trials import load_trials as _load_trials

    return _load_trials(path)
