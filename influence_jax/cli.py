"""What the entry points share: quiet library logs, and a user's mistake (bad data, a bad flag or
config override, a missing file), Ctrl-C or SIGTERM ends in one line on stderr and a non-zero
exit, never in a traceback. Entry points define their own flags; this module defines none."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from absl import app, flags, logging

from influence_jax import logs
from influence_jax.errors import ConfigError, DataError


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as KeyboardInterrupt for Ctrl-C), so that the
    cleanup on the way up (finally blocks, temporary files) runs before the exit."""


@contextlib.contextmanager
def stopped_cleanly(tool: str, sigterm: bool = True) -> Iterator[None]:
    """Ctrl-C exits 130 and (with `sigterm`) SIGTERM 143, each with one line, after the cleanup
    code on the way up ran (a SIGTERM left a tool's temporary files behind). A SIGTERM
    handler the program has already is kept."""
    previous = None
    if sigterm and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:

            def terminate(signum: int, frame: Any) -> None:
                raise Terminated()

            previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        _leave(f"{tool}: interrupted", 130)
    except Terminated:
        _leave(f"{tool}: terminated", 143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _leave(line: str, code: int) -> NoReturn:
    """Ends the process interrupted, with `line` on stderr, once the cleanup on the way up ran.

    Not through the interpreter's finalisation: a signal that lands while XLA compiles
    (jaxlib's compile_and_load waits interruptibly) leaves the compilation running on the
    PjRt client's threads, and finalisation's garbage collection then destroys that client
    under it: a segmentation fault (exit -11) instead of `code`. Nor does it wait for Python's
    non-daemon threads as an exit does: the input pipeline's have nothing to finish, and an
    Orbax save that the signal cut short cannot finish (exit shuts its executors down first;
    its threads then wait 300 s on each other and print tracebacks), so its uncommitted
    `<step>.orbax-checkpoint-tmp` folder stays, as it did, for the next run to remove. The
    rest of a normal exit is done here: a multi-process run leaves JAX's distributed
    runtime, log handlers (train.log) and stdout/stderr are flushed. Checkpoint managers and
    TensorBoard writers were closed on the way up (a save under way when the signal came
    during a step is committed then). Outside the main thread (no signal lands there):
    sys.exit as before."""
    print(line, file=sys.stderr)
    if threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    jax = sys.modules.get("jax")
    if jax is not None and hasattr(jax, "distributed"):
        # A no-op without a multi-process runtime; a second Ctrl-C stops waiting for the others.
        with contextlib.suppress(Exception, KeyboardInterrupt, Terminated):
            jax.distributed.shutdown()
    std_logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(code)


def run(body: Callable[[], None], tool: str) -> None:
    """Runs a tool's `body`; DataError/ConfigError exit 2, Ctrl-C 130 and SIGTERM 143, one line
    each."""
    logging.set_verbosity(logging.WARNING)
    # Orbax warns that the (read-only) checkpoint folder is read-only; keep its chatter out.
    logs.quiet_libraries(std_logging.ERROR, libs=("orbax",))
    logs.plain_terminal_and_file(None)  # "warning: ..." lines, without absl's prefix
    with stopped_cleanly(tool):
        try:
            body()
        except (DataError, ConfigError) as e:
            print(f"{tool}: error: {e}", file=sys.stderr)
            sys.exit(2)


def tool_main(body: Callable[[], None], tool: str) -> Callable[[list[str]], None]:
    """The absl `main` of a tool whose whole work is `body` (no positional arguments)."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(body, tool)

    return main


# --preempted_exit_code: the keywords of the integer flag that each entry point that trains
# (main, sweep, cv, select_features) defines with them.
PREEMPTED_EXIT_FLAG = dict(
    name="preempted_exit_code",
    default=0,
    help="Exit status when SIGTERM (a preemption notice) stopped training at a saved checkpoint. "
    "0 reads as finished to a scheduler; one that restarts only failed jobs (a Kubernetes Job "
    "with restartPolicy OnFailure, a systemd unit with Restart=on-failure, a retry loop around "
    "the command) resumes the run when this is non-zero, e.g. 143.",
    lower_bound=0,
    upper_bound=255,
)


def exit_preempted(tool: str, code: int) -> None:
    """After SIGTERM stopped training at a saved checkpoint: exits with `code` and one line when
    it is not 0 (--preempted_exit_code); returns otherwise."""
    if code:
        print(
            f"{tool}: stopped by SIGTERM at a saved checkpoint; the same command resumes "
            f"(exit {code}, --preempted_exit_code)",
            file=sys.stderr,
        )
        sys.exit(code)


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with a bad flag or config
    override as one line (ml_collections raises while it applies `--config.a.b=value`), and
    `--help` exiting 0 once it has printed the flags (absl's own exits 1)."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # ml_collections' get_config(arg) error
            flag = re.split(r": Error|:\s*\n", text, maxsplit=1)[0].removeprefix("flag ")
            text = f"{flag}: {text.strip().splitlines()[-1]}"
        sys.exit("error: " + " ".join(text.split()))
    except SyntaxError as e:  # a config file that is not Python
        sys.exit(f"error: --config: {e.filename}:{e.lineno}: not a Python config file ({e.msg})")
    except AttributeError as e:
        if "has no attribute 'get_config'" not in str(e):
            _bad_override(argv, e)
        sys.exit("error: --config: the file defines no get_config() (a Python config file does)")
    except (KeyError, TypeError, ValueError) as e:
        _bad_override(argv, e)


def _bad_override(argv: list[str], e: Exception) -> None:
    """Exits naming the config overrides and what was wrong with one of them."""
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    name, hint = re.search(r"'(\w+)'", text), re.search(r"Did you mean [^?]*\?", text)
    detail = f"no field {name.group(1)!r}" if name else " ".join(text.split())
    detail += f" ({hint.group(0)})" if hint else ""
    sys.exit(f"error: a config override ({', '.join(overrides)}) is not valid: {detail}")


def parse_seeds(values: list[str], flag: str = "seeds") -> list[int]:
    """A list flag of seeds as integers: at least one, each an integer, none twice (DataError
    naming the flag otherwise)."""
    given = ",".join(values)
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise DataError(f"--{flag}={given}: give integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        what = "no seed" if not seeds else "a seed twice"
        raise DataError(f"--{flag}={given}: names {what}; give e.g. 0,1,2")
    return seeds


def loaded_config(config: Any) -> Any:
    """The value of a config_flags flag; a file that failed to load (ml_collections defers that
    error to the config's first use) exits with one line."""
    try:
        config.keys()
    except OSError as e:
        sys.exit("error: --config: " + " ".join(str(e).split()))
    except AttributeError:
        sys.exit(
            f"error: --config: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def init_distributed() -> None:
    """Joins JAX's multi-process runtime where the environment asks for it: JAX_NUM_PROCESSES
    > 1 with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID (launch/), or
    INFLUENCE_JAX_AUTO_DISTRIBUTED=1 (settings detected by JAX). Training and rank.py call it
    before any JAX computation."""
    import jax

    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ConfigError(f"JAX_NUM_PROCESSES > 1 needs {' and '.join(missing)} set")
        # CPU hosts (and the tests' fake devices) need collectives across processes.
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("INFLUENCE_JAX_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # TPU VM pods, SLURM: settings detected by JAX
