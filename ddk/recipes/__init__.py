"""The application on top of the ``ddk`` library: recipes, the demo corpus, plots and the ``ddk`` command.

Nothing in the library imports this package. Modules by concern:

* ``cli`` — the ``ddk`` command; ``config`` — ``RecipeConfig`` (YAML presets and flags);
* ``models`` — loading the user's teacher, student and tokenizer, saving the student;
* ``data`` — the user's records packed per domain (``ddk.data``); ``corpus``/``sources``/``rdata``/
  ``tokenizer`` — the bundled demo corpus from Debian and PyPI packages and its tokenizer;
* ``demo`` — the demo teacher's pretraining and the demo student (cached);
* ``distill`` — the distillation loop (``ddk distill``) and ``evaluate``;
* ``checkpoint`` — run-folder checkpoints (safetensors + JSON + SHA-256 manifest); ``preempt`` —
  SIGTERM/SIGINT to a checkpoint and exit status 75; ``parallel`` — devices, DDP/FSDP2 wrapping;
* ``report`` — tables, summaries and plots (``plotting``); ``synthetic`` — the Markov-chain demo.
"""
