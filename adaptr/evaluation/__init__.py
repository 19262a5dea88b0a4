"""Evaluation: score adapter versions on held-out data, store the scores, compare versions,
gate tag moves.

- :mod:`~adaptr.evaluation.metrics`: metric names, ROUGE-L, sacrebleu's chrF/BLEU, exact match
- :mod:`~adaptr.evaluation.run`: :func:`~adaptr.evaluation.run.evaluate` (score and store)
- :mod:`~adaptr.evaluation.records`: stored eval records and measurements, typed
- :mod:`~adaptr.evaluation.gates`: requirements on a tag move,
  :func:`~adaptr.evaluation.gates.promote`
- :mod:`~adaptr.evaluation.compare`: versions x metrics, training loss curves

Import names from the submodule that holds them; drawing charts belongs to the CLI
(:mod:`adaptr.cli.charts`).
"""
