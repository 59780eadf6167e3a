"""XLA compile options for the programs that run once or seldom (the init program, checkpoint
checksums): on CPU, small ones compile about 2-3x faster without LLVM's optimisation and with
XLA:CPU's elemental emitters, and run several times slower, which for them costs less than the
compile saves. Measured on a 2-core AMD EPYC family 25 (Zen 3): the default model's init
compiled in 5.6-5.7 s with the usual options and 1.9-2.3 s with these, and ran in 0.01 against
0.06 s; a 1M x 32 table with its two Adam moments initialised in 1.1-1.3 s against 5.4-6.6 s.
The checksums of the default model's state compiled in 2.2 against 1.3 s; over 96M elements
they ran in 0.28 against 0.53 s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Programs over up to this many elements take the trade (the init program: 4M parameters keep
# its slowdown under about a second; it turns near 30M).
FAST_COMPILE_MAX_ELEMENTS = 4_000_000


def elements(shapes: Any) -> int:
    """The number of elements of a tree of arrays or ShapeDtypeStructs."""
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def fast_compile(platform: str, n_elements: int, limit: int | None = None) -> dict | None:
    """FAST_COMPILE for a CPU program over up to `limit` (default FAST_COMPILE_MAX_ELEMENTS)
    elements, else None (XLA's defaults: other platforms, larger programs)."""
    limit = FAST_COMPILE_MAX_ELEMENTS if limit is None else limit
    return dict(FAST_COMPILE) if platform == "cpu" and n_elements <= limit else None
