"""One module per entry point, named after its script: that job's config schema and orchestration.

``generate`` (generate.py), ``train`` (train.py), ``test`` (test.py), ``evaluate`` (evaluate.py),
``calibrate`` (calibrate.py), ``explain`` (explain.py), ``score`` (score.py), ``ijb``
(data/IJB/run_ijb.py). Each has ``SCHEMA`` (its config keys and defaults; calibrate takes flags only)
and ``run(...)``. A job imports the library (the rest of :mod:`transfira`), never another job.
"""
