"""Exceptions of the LoRA layer, so callers can tell a bad adapter from a bad routing request."""
from __future__ import annotations


class AdapterError(ValueError):
    """An adapter folder is missing, corrupt, or incompatible with the pool or the base model."""


class RoutingError(ValueError):
    """A routing request or a router's configuration is invalid."""


class CacheFullError(RuntimeError):
    """The adapter cache cannot hold the adapters one batch needs at the same time."""
