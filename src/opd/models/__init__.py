"""Models and what is done with them before any training: loading checkpoints and tokenizers (``loading``), the
teacher/student pairing check (``pairing``), chat-template encoding (``prompts``), the ``Rollouts`` batch
(``rollouts``) and forward passes over it (``scoring``)."""
