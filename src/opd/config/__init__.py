"""A run's configuration: the sections every run has (``sections``, importing nothing of opd), the whole ``Config``
assembled from the registries (``schema``), reading YAML and overrides (``loading.load_config``), the checks
(``validation``) and the redacted copy a run saves (``saving``)."""
