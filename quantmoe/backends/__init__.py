"""Quantization backends, one file each, found by name.

Every module in this package except ``base`` defines ``BACKENDS``: a tuple of objects
following ``base.Backend``. Adding a backend is adding one such file; nothing else
lists them. Modules must import optional libraries (bitsandbytes, ...) only inside
functions, so that ``quantmoe`` works without them until such a backend is chosen.

A module may also define ``READERS``: formats quantmoe reads but does not write
(llm-compressor's compressed-tensors), with the reading half of the interface only.

Names: ``gptq``, ``rtn``, ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``. ``resolve`` also takes
``<name>-int<bits>`` (``gptq-int4``, ``rtn-int8``) for backends with a ``bits`` setting.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache

from ..errors import QuantMoeError
from .base import Backend, Options, QuantizedLinear

__all__ = ["Backend", "Options", "QuantizedLinear", "registry", "names", "get", "resolve", "for_checkpoint"]


@cache
def registry() -> dict[str, Backend]:
    """Backend name -> backend, from every module of this package."""
    found: dict[str, Backend] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for backend in getattr(module, "BACKENDS", ()):
            if backend.name in found:
                raise RuntimeError(f"backend {backend.name!r} is defined twice (second in {module.__name__})")
            found[backend.name] = backend
    return found


@cache
def readers() -> tuple:
    """Every backend, then every read-only format: what ``for_checkpoint`` can recognise."""
    found = list(registry().values())
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            found.extend(getattr(importlib.import_module(f"{__name__}.{info.name}"), "READERS", ()))
    return tuple(found)


def names() -> list[str]:
    return list(registry())


def get(name: str) -> Backend:
    """The backend called ``name``, or a one-line error listing the known ones."""
    try:
        return registry()[name]
    except KeyError:
        raise QuantMoeError(f"unknown backend {name!r}; choose one of {', '.join(names())}") from None


def resolve(spec: str) -> tuple[Backend, object]:
    """A compare spec -> (backend, its config): ``bnb-nf4``, ``gptq`` or ``gptq-int4`` (bits given)."""
    spec = spec.strip()
    if spec in registry():
        backend = registry()[spec]
        return backend, backend.configure()
    m = re.fullmatch(r"(.+)-int(\d+)", spec)
    if m and m.group(1) in registry():
        backend = registry()[m.group(1)]
        return backend, backend.configure(bits=int(m.group(2)))
    raise QuantMoeError(f"unknown backend {spec!r}; choose from {', '.join(names())}, "
                        "or gptq-int4/gptq-int8/rtn-int4/rtn-int8")


def for_checkpoint(quantization: dict | None) -> Backend | None:
    """The backend that wrote a checkpoint with this ``quantization_config`` (None: not quantized)."""
    if quantization is None:
        return None
    for reader in readers():
        if reader.recognizes(quantization):
            return reader
    known = ", ".join(r.name for r in readers())
    raise QuantMoeError(f"quantization method {quantization.get('quant_method')!r} is not one quantmoe reads "
                        f"(it reads checkpoints of {known}); pass the original checkpoint instead")
