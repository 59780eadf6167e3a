"""What the command-line tools share: quiet library logs, and a user's mistake (bad data, a bad
flag value, a missing file) or Ctrl-C ends in one line on stderr and a non-zero exit, never in a
traceback. Tools define their own flags; this module reads none."""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable

from absl import logging

from influence_jax import logs
from influence_jax.errors import ConfigError, DataError


def run(body: Callable[[], None], tool: str) -> None:
    """Runs a tool's `body`; DataError/ConfigError exit 2 and Ctrl-C exits 130, one line each."""
    logging.set_verbosity(logging.WARNING)
    # Orbax warns that the (read-only) checkpoint folder is read-only; keep its chatter out.
    logs.quiet_libraries(std_logging.ERROR, libs=("orbax",))
    try:
        body()
    except (DataError, ConfigError) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        sys.exit(130)
