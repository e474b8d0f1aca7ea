"""The benchmark cases, one module per kernel family group. Each module lists `SPECS`: a name, a
family and a builder `build(device, dtype) -> Case` that allocates inputs only when the case runs."""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional

from ._spec import Spec

__all__ = ["Spec", "all_specs", "select"]


def all_specs() -> List[Spec]:
    from . import attention, codec, linear, rowops, sampling, tts

    return [*rowops.SPECS, *attention.SPECS, *sampling.SPECS, *codec.SPECS, *linear.SPECS, *tts.SPECS]


def select(specs: Iterable[Spec], only: Optional[List[str]], full: bool = False) -> List[Spec]:
    """Keep the specs matching any pattern: a case name, a family name, or a glob on the name.
    Without patterns: every spec, less the full_only ones unless `full`. A pattern that names a
    case exactly selects it even when it is full_only."""
    specs = list(specs)
    if not only:
        return [s for s in specs if full or not s.full_only]
    pats = [p.strip() for item in only for p in item.split(",") if p.strip()]

    def hit(s):
        if any(p == s.name for p in pats):
            return True
        return (full or not s.full_only) and any(p == s.family or fnmatch.fnmatchcase(s.name, p) for p in pats)

    return [s for s in specs if hit(s)]
