"""Training: the ``transformers.Trainer`` subclasses (``trainer``: SFT, ``dpo``: preferences), what they are given
(``prepare``), member upkeep between steps (``upkeep``: learned weights, revival of dead members) and what a run
writes (``outputs``, ``model_card``). Imports the core and ``data``."""
