"""Guidance-weight search with Optuna (:mod:`search.optuna_search`)."""
