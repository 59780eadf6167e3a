"""Shared test helpers (the only module tests import from each other): tiny configs and datasets,
the engine on tiny configs, hand-made event logs, trained tiny runs, and real training processes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import tiny
from influence_jax import engine, sharding, train, xla_options
from influence_jax.data import pipeline, prepare, readers, synthetic
from influence_jax.data.schema import Schema
from influence_jax.data.store import ExampleStore

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
BENCH = TOOLS / "bench"  # benchmark code: importable as top-level modules from this folder
DATA = os.environ.get("INFLUENCE_JAX_DATA", "")  # the real datasets (CI sets it)
needs_data = pytest.mark.skipif(not DATA, reason="INFLUENCE_JAX_DATA is not set")

# XLA:CPU flags for tests (tiny models, where compiling is most of the time; no result changes
# beyond float rounding), the options the engine compiles its small one-off programs with
# (xla_options.FAST_COMPILE): LLVM's backend optimisation off, and the older elemental emitters
# instead of the MLIR fusion emitters. On a 2-core AMD EPYC family 25 (Zen 3), the tiny
# model's train step compiled in 5.1-5.7 s without the second flag and 2.8-3.3 s with it
# (three runs each); the optimised benchmark step, though, trains 0-25 % and scores 2.5x
# slower with it, so only tests compile everything so (and long trainings, `optimize`, not).
FAST_COMPILE = " ".join(f"--{k}={str(v).lower()}" for k, v in xla_options.FAST_COMPILE.items())
# XLA:CPU's usual options for the same keys (over this process's flags): what the fast ones
# are checked against.
USUAL_COMPILE = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}


def need(*parts: str) -> str:
    """A file of the real datasets; fails (does not skip) when INFLUENCE_JAX_DATA lacks it."""
    path = os.path.join(DATA, *parts)
    assert os.path.exists(path), f"INFLUENCE_JAX_DATA={DATA!r} is set but {path} is missing"
    return path


# ----------------------------------------------------------------------------- tiny configs


def tiny_config(**overrides):
    """configs/tiny.py with dotted overrides, e.g. tiny_config(**{"loop.num_steps": 5})."""
    config = tiny.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@functools.lru_cache(maxsize=4)
def tiny_dataset(root: str, seed: int = 0):
    """(schema, path) of the tiny synthetic dataset under `root` (generated once per session)."""
    config = tiny_config(**{"data.synthetic.seed": seed})
    path = f"{root}/tiny-data-{seed}"
    return synthetic.ensure(config.data.synthetic, path), path


def first_batch(schema, path, batch_size: int = 64) -> dict[str, np.ndarray]:
    store = ExampleStore(path, "train", schema)
    return pipeline.TrainBatches(store, batch_size, seed=0, num_batches=1)[0]


def damaged_copy(path, copy, schema, split: str, column: str, damage) -> str:
    """A copy of the dataset at `path` in `copy` whose first `split` shard has `column` passed
    through `damage` (it edits the loaded array in place); returns the copy's path."""
    shutil.copytree(path, copy)
    shard = os.path.join(copy, schema.splits[split]["shards"][0])
    values = np.load(os.path.join(shard, f"{column}.npy"))
    damage(values)
    np.save(os.path.join(shard, f"{column}.npy"), values)
    return str(copy)


def setup(config, schema, devices=None) -> tuple[engine.Engine, engine.TrainState]:
    """(engine, initial state) of `config` on `devices` (default all), state not donated."""
    mesh = sharding.make_mesh(config.mesh, devices)
    eng = engine.setup(config, schema, mesh, donate=False)
    return eng, eng.init_state()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder NAME that `build(path)` makes, built once per test session whatever the
    number of pytest-xdist workers: the first to ask builds it under a file lock in the
    session's temporary root, the others wait for it and reuse it (a tiny training is 10-15 s
    of a 2-core machine's default tier)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            build(path)
            done.touch()
    return path


def trained_tiny_run(tmp_path_factory) -> str:
    """WORKDIR of a configs/tiny.py run, trained once per test session."""
    build = lambda workdir: train.train_and_evaluate(tiny_config(), str(workdir))
    return str(built_once(tmp_path_factory, "tiny-ranking-run", build))


# ----------------------------------------------------------------------------- event logs

# user, item, category, behaviour, time (Taobao layout). Boundaries: valid 500, test 900.
LOG = """\
7,10,1,pv,100
7,11,1,fav,200
7,12,2,pv,300
7,10,1,cart,300
7,10,1,buy,400
7,13,2,pv,400
7,12,2,buy,1000
8,11,1,pv,150
8,11,1,buy,250
8,12,2,buy,600
9,13,2,buy,120
"""
ITEM = {10: 2, 11: 3, 12: 4, 13: 5}  # raw item -> vocabulary id (sorted raw ids from 2)
CAT = {1: 2, 2: 3}
PV, CART, FAV, BUY = 2, 3, 4, 5  # behaviour ids: type k -> k + 2


def write(path, text: str) -> str:
    with open(path, "w", newline="") as f:
        f.write(text)
    return str(path)


def prepare_log(path, out, source="taobao", **kw) -> Schema:
    """Prepares the log `path` into `out` (boundaries valid 500, test 900 by default)."""
    kw.setdefault("valid_start", 500)
    kw.setdefault("test_start", 900)
    kw.setdefault("min_timestamp", 0)
    return prepare.prepare(
        readers.open_source(source, str(path)), str(out), prepare.PrepareOptions(**kw)
    )


def rows(out, split: str) -> dict[str, np.ndarray]:
    store = ExampleStore(str(out), split)
    return store.gather(np.arange(len(store)))


def random_log(n_users: int, n_items: int, n: int, seed: int) -> str:
    """A Taobao-layout log with many timestamp ties."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users + 1, n)
    items = rng.integers(1, n_items + 1, n)
    beh = rng.choice(["pv", "cart", "fav", "buy"], n, p=[0.5, 0.2, 0.1, 0.2])
    ts = rng.integers(1000, 1100, n)
    return "".join(
        f"{u},{i},{i % 3},{b},{t}\n" for u, i, b, t in zip(users, items, beh, ts, strict=True)
    )


# ----------------------------------------------------------------------------- side tables

SIDE_LOG = """\
u,i,b,t
1,10,view,100
1,11,view,200
1,12,buy,300
2,10,view,150
2,13,buy,250
3,11,view,120
3,12,view,600
3,10,buy,700
"""
# No header; the price of item 13 is missing; item 11 has three genres, 12 none.
SIDE_ITEMS = """\
10;5.0;A|B;7;x
11;20.0;B|C|D;7;y
12;100.0;;8;x
13;;A;8;z
"""
SIDE_USERS = "1,30,FR\n2,55,DE\n3,41,FR\n"


def open_side_source(tmp_path, **kw):
    """The events source of SIDE_LOG with the headerless item table SIDE_ITEMS (and `kw`)
    (tests/test_side_tables.py, tests/test_serving.py)."""
    return readers.open_source(
        "events",
        write(tmp_path / "log.csv", SIDE_LOG),
        user="u",
        item="i",
        behaviour="b",
        timestamp="t",
        behaviour_types=("view", "buy"),
        item_table=write(tmp_path / "items.csv", SIDE_ITEMS),
        item_table_names=("i", "price", "genres", "cat", "brand"),
        item_table_delimiter=";",
        multi_value_fields=("genres",),
        **kw,
    )


def prepare_side_tables(tmp_path, **kw):
    src = open_side_source(
        tmp_path,
        user_table=write(tmp_path / "users.csv", SIDE_USERS),
        user_table_names=("u", "age", "country"),
        item_fields=("price", "genres"),
        item_category="cat",
        numeric_fields=("price", "age"),
        numeric_buckets=2,
        multi_value_sep="|",
        max_bag=2,
        **kw,
    )
    opts = prepare.PrepareOptions(
        target_behaviours=("buy",), neg_ratio=0, valid_start=500, test_start=650
    )
    return prepare.prepare(src, str(tmp_path / "p"), opts)


# ----------------------------------------------------------------------------- real processes

FLAGS = ("--config.ckpt.every=5",)  # tiny: 20 steps, evaluations at 10 and 20


@dataclasses.dataclass
class Finished:
    returncode: int
    log: str


def subprocess_env(
    cache_dir: str, devices: int = 8, optimize: bool = False, **extra: str
) -> dict[str, str]:
    """The environment of a test's child process: CPU, `devices` fake devices, a shared
    persistent compilation cache (only the first process of a session compiles), and unless
    `optimize` (long trainings) the fast-compiling flags, as in this process (FAST_COMPILE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    flags = f"--xla_force_host_platform_device_count={devices}"
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags if optimize else f"{flags} {FAST_COMPILE}",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return env


def start(
    workdir: Path,
    *overrides: str,
    cache: str,
    devices: int = 8,
    tag: str = "",
    config: str = "configs/tiny.py",
    optimize: bool = False,
    **env: str,
) -> tuple[subprocess.Popen, Path]:
    """Starts the training command on `config`; its output goes to WORKDIR-TAG.log."""
    log = workdir.parent / f"{workdir.name}{tag}.log"
    cmd = [sys.executable, "-m", "influence_jax.main", f"--config={config}",
           f"--workdir={workdir}", *overrides]  # fmt: skip
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(cache, devices, optimize, **env), stdout=f, stderr=f
        )
    return proc, log


# Tests are bounded by steps; a subprocess limit only catches a hang. Limits are the quiet-machine
# budget times this factor (CI may run on a machine loaded 10-25x), and a limit that is hit says
# the load it saw.
HANG_FACTOR = float(os.environ.get("INFLUENCE_JAX_TEST_HANG_FACTOR", "5"))


def _timed_out(what: str, timeout: float) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{what} did not finish in {timeout:.0f} s: a hang, or a machine far busier than the "
        f"tests assume (load average {load:.1f} on {os.cpu_count()} cores; raise "
        "INFLUENCE_JAX_TEST_HANG_FACTOR to wait longer)"
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> Finished:
    timeout *= HANG_FACTOR
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{_timed_out('training', timeout)}:\n{log.read_text()[-4000:]}")
    return Finished(proc.returncode, log.read_text())


def run_main(workdir: Path, *overrides: str, cache: str, **kw) -> Finished:
    return finish(*start(workdir, *overrides, cache=cache, **kw))


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Polls every 10 ms until `predicate()`; fails if the process exits first."""
    deadline = time.monotonic() + timeout * HANG_FACTOR
    while not predicate():
        late = time.monotonic() > deadline
        if proc.poll() is not None or late:
            proc.kill()
            why = _timed_out("the wait", timeout * HANG_FACTOR) if late else "the process exited"
            pytest.fail(
                f"condition not reached ({why}, rc={proc.poll()}):\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.01)


def run_tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs tools/NAME.py with `args` from the repo root; output captured as text."""
    cmd = [sys.executable, str(TOOLS / f"{name}.py"), *args]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout * HANG_FACTOR, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(_timed_out(f"tools/{name}.py", timeout * HANG_FACTOR))


def bench_module(name: str):
    """The benchmark module tools/bench/NAME.py (its siblings import each other by name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def ckpt_steps(workdir: Path) -> list[int]:
    """Committed checkpoint steps (half-written ones carry a suffix)."""
    return sorted(int(n) for n in os.listdir(Path(workdir) / "checkpoints") if n.isdigit())


def load_state(workdir: Path, step: int) -> dict:
    """A checkpoint's TrainState as a dict of numpy arrays (no devices or model needed)."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    differ = [
        jax.tree_util.keystr(p)
        for (p, x), (_, y) in zip(flat_a, flat_b, strict=True)
        if not np.array_equal(x, y)
    ]
    assert not differ, f"{len(differ)} of {len(flat_a)} leaves differ: {differ[:8]}"


def assert_trees_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    """Both trees have the same structure and each leaf of a is within tolerance of b's."""
    jax.tree_util.tree_map_with_path(
        lambda p, x, y: np.testing.assert_allclose(
            x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(p)
        ),
        a,
        b,
    )


def scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard event files, read back by TensorBoard."""
    acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def reference_run(tmp_path_factory, cache: str) -> Path:
    """WORKDIR of one uninterrupted run of configs/tiny.py with FLAGS, made once per session."""

    def build(workdir: Path) -> None:
        out = run_main(workdir, *FLAGS, cache=cache)
        assert out.returncode == 0, out.log[-4000:]
        assert ckpt_steps(workdir)[-1] == 20

    return built_once(tmp_path_factory, "reference", build)


def session_cache(pytestconfig, tmp_path_factory) -> str:
    """The compilation cache of the subprocesses: kept across sessions in pytest's cache."""
    if getattr(pytestconfig, "cache", None) is not None:
        return str(pytestconfig.cache.mkdir("jax-compilation-cache"))
    return str(tmp_path_factory.getbasetemp() / "jax-cache")
