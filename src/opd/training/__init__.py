"""Training a student: the set-up (``assembly``, ``preflight``), the loop (``loop``: the step and the run), held-out
evaluation (``evaluation``), and what a run leaves on disk — checkpoints, the resume policy, the run directory and
its lock, the final model, metrics, curves — each in its own module."""
