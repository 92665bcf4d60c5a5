"""Inference backends behind one small protocol; each imports its own library lazily."""

from .base import Backend

__all__ = ["Backend"]
