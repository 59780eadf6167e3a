"""Ctrl-C during a training's start, while XLA compiles the train step: exit 130 with one line,
never a segmentation fault (the compilation, left running on XLA's threads, once outlived the
JAX client that the interpreter's finalisation destroyed), and the same command then trains."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import HANG_FACTOR, ROOT, subprocess_env

# The training command, in a child that has Python's Ctrl-C handler whatever disposition it
# inherited (a shell's background job starts with SIGINT ignored, and Python then installs
# none), and that says on stderr when XLA starts compiling a program: the test interrupts a
# compilation, not a guessed moment. JAX's monitoring events tell: the start of a backend
# compilation names the program, then (its cache key computed) the persistent cache lookup
# comes right before XLA compiles. Importing JAX first starts no backend (hostmem's settings
# still come before it).
_ANNOUNCING_MAIN = """
import runpy, signal, sys
import jax
signal.signal(signal.SIGINT, signal.default_int_handler)
program = [None]
def named(event, value, fun_name=None, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        program[0] = fun_name
def compiling(event, **kw):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
        print(f"compiling {program[0]}", file=sys.stderr, flush=True)
jax.monitoring.register_scalar_listener(named)
jax.monitoring.register_event_listener(compiling)
sys.argv[0] = "influence_jax.main"
runpy.run_module("influence_jax.main", run_name="__main__", alter_sys=True)
"""
TIMEOUT = 120 * HANG_FACTOR  # seconds: only a hang reaches it (the tiny run takes about 10)


def test_ctrl_c_while_the_train_step_compiles_exits_130_and_the_rerun_trains(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config=configs/tiny.py", f"--workdir={workdir}"]
    # An empty compilation cache of its own (the train step is compiled, not read back), and
    # XLA's usual options: the train step compiles for 4-5 s (0.5-1 s with the tests'
    # fast-compiling ones), still running when the interrupted process ends. glibc fills
    # freed memory (MALLOC_PERTURB_): the JAX client's memory, once the interpreter's
    # finalisation freed it under that compilation, crashes it every time, not now and then.
    cache = str(tmp_path / "jax-cache")
    env = subprocess_env(cache, devices=1, optimize=True, MALLOC_PERTURB_="165")
    proc = subprocess.Popen(
        [sys.executable, "-c", _ANNOUNCING_MAIN, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(TIMEOUT, proc.kill)  # a hang fails the test, not the session
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "compiling jit(train_step)":
                break
        else:
            pytest.fail(f"the run ended before compiling its train step:\n{''.join(lines)}")
        # Into the compilation: the line comes a few Python lines before XLA starts. (Any
        # other moment must exit 130 as well; this one is where the process crashed.)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate()
    finally:
        watchdog.cancel()
    out = "".join(lines) + rest
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert rest.strip().splitlines()[-1:] == ["influence_jax.main: interrupted"], out[-4000:]
    assert "Traceback" not in out and "Fatal Python error" not in out, out[-4000:]
    saved = [p.name for p in workdir.glob("checkpoints/*") if p.name != "metadata"]
    assert not saved, f"no step was trained, yet {saved} in checkpoints/"

    again = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", *args],
        cwd=ROOT, env=subprocess_env(cache, devices=1), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    assert "final test metrics at step 20" in again.stdout, again.stdout + again.stderr[-4000:]
