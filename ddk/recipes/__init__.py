"""The application on top of the ``ddk`` library: the ``ddk`` command, its configuration, the demo
corpus and its models, reports and plots.

Nothing in the library imports this package; the engine (``ddk.engine``) does the work of every run
(components, loop, checkpoints, evaluation). Modules by concern:

* ``cli`` — the ``ddk`` command; ``options`` — which options each command takes, in its ``--help``
  sections; ``config`` — ``RecipeConfig`` (the engine's ``RunConfig`` plus the demo's options, YAML
  presets in ``configs/``, flags);
* ``distill`` — ``ddk distill`` and ``ddk evaluate`` (the engine's loop and evaluation with the
  CLI's report); ``teacher_cache`` — ``ddk teacher-cache``;
* ``demo`` — the bundled demo (its teacher's pretraining and student, cached); ``corpus``,
  ``sources``, ``rdata`` and ``tokenizer`` — its corpus from Debian and PyPI packages and its
  tokenizer; ``synthetic`` — the Markov-chain demo;
* ``report`` — tables, summaries, ``ddk compare``; ``plotting`` — the run folder's plots.
"""
