"""Studies over many federations: the ``compare`` and ``pareto`` commands and the claims' statistics.

A command family that uses the library and that nothing in the library uses (only ``cli.py``
imports it):

- ``compare.py``: several algorithms on identical seeds, data and budget; summary table, plots, β ablation;
- ``pareto.py``: preference sweeps, one federation per preference; the fronts;
- ``claims.py``: paired t-intervals over seeds, Holm-adjusted verdicts, minimum detectable effects
  (numpy and scipy on metric rows);
- ``fronts.py``: the front geometry, ``non_dominated`` and ``hypervolume`` (numpy only).
"""
