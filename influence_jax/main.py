"""Entry point: `python -m influence_jax.main --config=configs/default.py --workdir=runs/demo`.

Multi-process runs (one process per host) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (see launch/); with INFLUENCE_JAX_AUTO_DISTRIBUTED=1, jax.distributed finds the
processes itself (TPU VM slices, SLURM). SIGTERM saves a checkpoint and exits 0 (or
--preempted_exit_code); a NaN or Inf loss exits 1 naming the step. The same command again
resumes from the last checkpoint.
"""

import contextlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from influence_jax import cli, errors, files, hostmem, logs

# Config files import their siblings as `configs.<name>`; make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory",
    "auto",
    list(hostmem.HOST_MEMORY),
    "Keep freed host memory for reuse (influence_jax/hostmem.py): in one allocator arena "
    "(large per-step buffers), in each thread's own (small ones), auto (one arena from 1024 "
    "rows of the train batch per CPU device), or off (glibc's defaults). Measured in "
    "docs/benchmarks.md.",
)
_PREEMPTED_EXIT = flags.DEFINE_integer(**cli.PREEMPTED_EXIT_FLAG)
flags.mark_flags_as_required(["config", "workdir"])
LOG_FILE = "train.log"  # in the workdir: every log line with absl's prefix (the terminal: plain)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # JAX's INFO lines too: "Unable to initialize backend 'tpu'" on every CPU or GPU host.
    logs.quiet_libraries(libs=("orbax", "grain", "jax"))
    from influence_jax import config_check

    try:
        config = cli.loaded_config(_CONFIG.value)
        config_check.check(config)  # before the multi-process runtime starts
        if not _WORKDIR.value.strip():
            raise errors.ConfigError("--workdir: give the run's folder")
        if "://" not in _WORKDIR.value:  # a local folder: no file in the way, writable
            files.check_output(_WORKDIR.value, "workdir", folder=True)
            _check_apart_from_data(config, _WORKDIR.value)
        # What WORKDIR holds now: a failed start removes what it adds (_undo_start).
        made = (_WORKDIR.value, files.entries(_WORKDIR.value))
        one_arena = hostmem.arenas(_HOST_MEMORY.value, int(config.data.batch_size))
        kept = one_arena is not None and hostmem.keep_freed_host_memory(one_arena)  # before JAX
        cli.init_distributed()
        import jax

        from influence_jax import loop, train

        preempt = loop.Preemption()  # SIGTERM from here on: a checkpoint and a clean stop
        log_file = os.path.join(_WORKDIR.value, LOG_FILE) if jax.process_index() == 0 else None
        logs.plain_terminal_and_file(log_file)
        logging.info(  # every process says it joined; then only process 0 logs progress
            "JAX %s, process %d of %d processes, devices: %s",
            jax.__version__, jax.process_index(), jax.process_count(), jax.devices(),
        )  # fmt: skip
        if jax.process_index() != 0:
            logging.set_verbosity(logging.WARNING)
        if kept:
            where = "one allocator arena" if one_arena else "each thread's allocator arena"
            logging.info("freed host memory kept for reuse in %s (--host_memory)", where)
        train.train_and_evaluate(config, _WORKDIR.value, preempt)
        if preempt.requested:
            cli.exit_preempted("influence_jax.main", _PREEMPTED_EXIT.value)
    except (errors.ConfigError, errors.DataError, errors.CheckpointError) as e:
        _stop(f"error: {e}", undo=locals().get("made"))
    except errors.TrainingError as e:
        _stop(f"training stopped: {e}")


def _check_apart_from_data(config, workdir: str) -> None:
    """ConfigError for a --workdir that is, or lies in, the prepared dataset's folder: preparing
    the data again replaces that folder as a whole (prepare_data.py refuses while a run's
    files are there, but the run belongs apart from it)."""
    path = str(config.data.get("path") or "")
    if config.data.source == "synthetic" or not path or "://" in path:
        return
    w, d = os.path.realpath(workdir), os.path.realpath(path)
    if w == d or w.startswith(d + os.sep):
        raise errors.ConfigError(
            f"--workdir={workdir} {'is' if w == d else 'lies in'} the dataset folder "
            f"config.data.path={path}; train in a folder apart from the data"
        )


def _undo_start(workdir: str, before: set[str] | None) -> None:
    """After a start that stopped on a config or data error: when the run added nothing to
    WORKDIR but the log this process began (train.undo_failed_start removes the rest), the
    log goes, and WORKDIR too when it was not there (`before` None). Process 0 only (it keeps
    the log)."""
    jax = sys.modules.get("jax")
    now = files.entries(workdir)
    if now is None or LOG_FILE in (before or set()) or (jax and jax.process_index() != 0):
        return
    if now - {LOG_FILE} - (before or set()):
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, LOG_FILE))
    if before is None:
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


def _stop(message: str, undo: tuple[str, set[str] | None] | None = None) -> None:
    """Exits with `message` on the terminal, and in train.log when it was opened; `undo`:
    _undo_start's arguments."""
    logs.error_to_files(message)
    if undo:
        _undo_start(*undo)
    sys.exit(message)


def run():
    """The `influence-jax` console script. absl's --help lists the flags of the module named by
    sys.argv[0] (here the script), so this module's flags are registered under it too."""
    for flag in flags.FLAGS.flags_by_module_dict().get(__name__, []):
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
    app.run(_main, flags_parser=cli.parse_flags)


def _main(argv):
    """main, with Ctrl-C (exit 130) as one line once the cleanup on the way up (the workdir
    lock) ran. SIGTERM is training's own: a checkpoint and a clean stop (with several
    processes, JAX's preemption service agrees on the step), so no handler is added here."""
    with cli.stopped_cleanly("influence_jax.main", sigterm=False):
        main(argv)


if __name__ == "__main__":
    run()
