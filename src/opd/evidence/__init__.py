"""Evidence for the papers' claims: claim sets (``claims``), running them over seeds (``compare``), the report and
its plots (``report``), and a run's per-token view (``inspection``, ``opd inspect``). docs/compare.md has the whole
picture."""
