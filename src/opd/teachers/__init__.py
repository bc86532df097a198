"""Teachers turn rollouts into signals (``base``: the ``Teacher`` protocol): local models, the student's own or EMA
weights (``model``), per-example routes (``routed``), a server (``served``); and verbal judges (``judges``)."""
