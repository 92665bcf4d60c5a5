"""Exceptions the runtime raises for things a user can fix. The CLI prints them as one line."""

from __future__ import annotations


class ImunetError(Exception):
    """Base class: an error whose message is meant for the user, not a traceback."""


class InputError(ImunetError, ValueError):
    """A scan that cannot be read or used (missing, corrupt, wrong dimensionality, ...)."""


class OutputError(ImunetError, ValueError):
    """An output that cannot be written as asked (it exists, or its format is not writable)."""


class BundleError(ImunetError, ValueError):
    """A model bundle that is missing, corrupt, or incompatible with this runtime."""


class BackendError(ImunetError, RuntimeError):
    """An inference backend that is unavailable or failed to load a graph."""
