"""Inference and evaluation: the KV-cached ensemble forward and prompt encoding (``inference``), scoring of
completions (``scoring``), posterior routing (``routing``), multiple-choice and held-out sequence evaluation
(``multiple_choice``, ``sequences``), OOD detection (``ood``), token uncertainty and generation
(``token_uncertainty``, ``generate``), reports and plots, and the lm-evaluation-harness model (``harness``). Imports the
core and ``data``."""
