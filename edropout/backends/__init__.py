"""Ways to run an iteration's heavy parts, behind one ``backend=`` argument: objects with one interface
(``base.Backend``) that give the same energies (to float tolerance) for the same states.

``EDropout(backend=...)`` takes a registered name or a ``Backend`` object; ``register_backend`` adds a name.
"""
from __future__ import annotations

from .auto import AutoBackend
from .base import Backend
from .batched import BatchedBackend
from .compact import CompactBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS = {backend.name: backend for backend in (ReferenceBackend, BatchedBackend, CompactBackend, TritonBackend,
                                                  AutoBackend)}


def register_backend(name: str, backend_class: type) -> None:
    """Make ``EDropout(backend=name)`` build a ``backend_class()`` (a ``Backend`` subclass)."""
    if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
        raise TypeError(f"register_backend needs a subclass of edropout.backends.Backend, got {backend_class!r}")
    BACKENDS[name] = backend_class


def make_backend(backend) -> Backend:
    """A new backend for a registered name, or ``backend`` itself when it is a ``Backend`` object."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in BACKENDS:
        return BACKENDS[backend]()
    raise ValueError(f"unknown backend {backend!r}: use one of {tuple(BACKENDS)} or an edropout.backends.Backend "
                     f"object")


__all__ = ["BACKENDS", "AutoBackend", "Backend", "BatchedBackend", "CompactBackend", "ReferenceBackend",
           "TritonBackend", "make_backend", "register_backend"]
