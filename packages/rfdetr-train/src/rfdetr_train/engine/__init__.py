"""The Accelerate-driven training and validation engine of rfdetr-train.

* :mod:`~rfdetr_train.engine.api` — ``train(**options)``: config -> run directory -> :class:`Trainer`.
* :mod:`~rfdetr_train.engine.trainer` — the loop (accumulation, clipping, NaN guard, EMA, validation, saves).
* :mod:`~rfdetr_train.engine.recipes` — fine-tuning (upstream) and from-scratch (seg-tiny) numbers.
* :mod:`~rfdetr_train.engine.optim`, :mod:`~.schedule`, :mod:`~.ema`, :mod:`~.guard`, :mod:`~.early_stop`.
* :mod:`~rfdetr_train.engine.state`, :mod:`~.run_dir` — resumable checkpoints and ``--resume``.
* :mod:`~rfdetr_train.engine.commands` — the ``train`` / ``val`` subcommand handlers.
"""
