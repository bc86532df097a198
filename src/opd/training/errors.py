"""The error that stops a training run that cannot go on (too many non-finite steps in a row, a student with nothing
to train, a context with no room for a prompt): one line, printed by the command line."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""
