"""``tierstore bench quality``: ``eval`` runs the needle / perplexity / mass-coverage cases,
``report`` summarises, merges and prints their results."""

from .eval import quality

__all__ = ["quality"]
