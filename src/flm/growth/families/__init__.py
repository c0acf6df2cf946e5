"""The growth families' tensor behaviour, one module each: flm/growth/families/<name>.py defines `BEHAVIOUR` for the
family declared under that name in flm.config.growth.FAMILIES (what it can grow, whether exactly, how it treats
new layers, Adam state and masks). The modules are found by listing this package, so a new family is its
declaration, its module and its tests; tests/test_growth_families.py checks that both sides name the same families.
"""

from __future__ import annotations

import importlib
import pkgutil

from flm.config.growth import family
from flm.growth.families.base import Behaviour

BEHAVIOURS: dict[str, Behaviour] = {
    info.name: importlib.import_module(f"{__name__}.{info.name}").BEHAVIOUR
    for info in pkgutil.iter_modules(__path__) if info.name != "base"
}


def behaviour(name: str) -> Behaviour:
    """The tensor behaviour of family `name`; an unknown name is a one-line error listing the registered ones."""
    return BEHAVIOURS[family(name).name]
