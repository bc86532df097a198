"""The embedded worlds opd ships and runs on without downloads: their specs (``arithmetic``, ``search``), the
character tokenizer (``tokenizer``), where they are found (``locate``) and how they are built (``build``)."""
