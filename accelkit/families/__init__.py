"""Model-family traits registry: one :class:`FamilyTraits` record per family, one file each.

Every module of this package (other than ``base``) that defines ``TRAITS`` (a record or a tuple of
records) is imported on first lookup; tests and plugins may also :func:`register` records at run time.
Lookups take a pipeline, a denoiser, a class or a class name and fall back to :data:`GENERIC`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from accelkit.families.base import GENERIC, GENERIC_KEEP_16BIT, FamilyTraits

__all__ = ["GENERIC", "GENERIC_KEEP_16BIT", "FamilyTraits", "all_families", "register", "traits_for", "unregister"]

_REGISTRY: dict[str, FamilyTraits] = {}
_DISCOVERED = False


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = getattr(module, "TRAITS", None)
        for traits in found if isinstance(found, tuple) else (found,):
            if isinstance(traits, FamilyTraits):
                register(traits)


def register(traits: FamilyTraits) -> FamilyTraits:
    """Add ``traits`` to the registry (a record of the same name is replaced) and return it."""
    if not isinstance(traits, FamilyTraits):
        raise TypeError(f"register() takes FamilyTraits, got {type(traits).__name__}")
    _REGISTRY[traits.name] = traits
    return traits


def unregister(name: str) -> None:
    """Remove the family ``name`` (tests registering toy families clean up with this)."""
    _REGISTRY.pop(name, None)


def all_families() -> tuple[FamilyTraits, ...]:
    """Every registered family, discovered ones included, sorted by name."""
    _discover()
    return tuple(sorted(_REGISTRY.values(), key=lambda t: t.name))


def _class_names(subject: Any) -> list[str]:
    if isinstance(subject, str):
        return [subject]
    cls = subject if isinstance(subject, type) else type(subject)
    return [c.__name__ for c in cls.__mro__]


def traits_for(subject: Any) -> FamilyTraits:
    """The traits of a pipeline, denoiser, class or class name; :data:`GENERIC` when none matches.

    Subclasses inherit their base class's family (a user's ``MyFluxPipeline(FluxPipeline)``).
    """
    _discover()
    if subject is None:
        return GENERIC
    families = list(_REGISTRY.values())
    for name in _class_names(subject):
        for traits in families:
            if name in traits.pipeline_classes or name in traits.denoiser_classes:
                return traits
    return GENERIC
