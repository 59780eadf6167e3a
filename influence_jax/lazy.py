"""Modules imported on first use.

A tool's heavy imports (JAX, Orbax, Grain, the models: 2-3 s on 2 cores) bound with `module`
leave `--help` and flag errors fast: absl parses the flags before the tool's main touches
them. tests/test_tools.py checks that no tool starts JAX for `--help`.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def module(name: str) -> types.ModuleType:
    """The module `name`, its code run on first attribute access. Names from it must be reached
    as attributes (`ranking.rank`), not with `from ... import`, or the import happens at once.
    A submodule's parent packages are imported at once (finding it needs their paths), so bind
    only modules whose packages are light: `influence_jax.ranking.output` would load JAX
    through `influence_jax.ranking`. Raises ImportError where no such module is installed."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
