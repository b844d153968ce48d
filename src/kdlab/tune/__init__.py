"""Hyperparameter search (``kdlab tune``): an Optuna study whose trials are ordinary kdlab runs.

* :mod:`kdlab.tune.space` — the ``--space`` grammar (``uniform``, ``log``, ``int``, ``logint``, ``choice``);
* :mod:`kdlab.tune.study` — the study folder: spec, journal storage, claiming trials, requeueing dead workers' trials;
* :mod:`kdlab.tune.worker` — a worker: runs claimed trials in-process, reports val accuracy to the pruner;
* :mod:`kdlab.tune.search` — the command: checks the spec, starts the workers through a launcher, writes the report;
* :mod:`kdlab.tune.report` — results table, importance of each key, the best trial as a recipe.

Needs the ``optuna`` package (``pip install 'kdlab[tune]'``). Trials read the val split held out of the training set
(``data.val_split``), never the test split.
"""
