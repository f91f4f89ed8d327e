"""Quantization backends, one file each, found by name.

Every module in this package except ``base`` defines ``BACKENDS``: a tuple of objects
following ``base.Backend``. Adding a backend is adding one such file; nothing else
lists them. Modules must import optional libraries (bitsandbytes, ...) only inside
functions, so that ``quantmoe`` works without them until such a backend is chosen.

Reading a checkpoint back is the format's business (``quantmoe.formats``), not the backend's.

Names: ``gptq``, ``rtn``, ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``. ``resolve`` also takes
``<name>-int<bits>`` (``gptq-int4``, ``rtn-int8``) for backends with a ``bits`` setting.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache

from ..base.errors import QuantMoeError
from .base import Backend, Options

__all__ = ["Backend", "Options", "registry", "names", "get", "resolve"]


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
