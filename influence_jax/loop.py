"""The step loop of a run: progress logs and summaries, evaluation, early stopping, checkpoints
(last K + best, WORKDIR/best.json), the NaN guard and preemption (SIGTERM)."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
from absl import logging

from influence_jax import checkpoint as ckpt_lib
from influence_jax import logs, metrics, sharding
from influence_jax.config_check import metric_mode
from influence_jax.errors import TrainingError


class Preemption:
    """SIGTERM (a preemption notice) as a stop request that the loop checks after every step.

    One process: a Python signal handler sets a flag. Several processes: JAX's preemption
    service (started by jax.distributed.initialize) catches the signal on any host and agrees on
    one step at which every process stops, so that all of them save the same step.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._old = None
        if not self._multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # jax_enable_preemption_service=False
                logging.warning("preemption checks off: %s", e)
                self._multi = False
        return self.requested

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class EarlyStopping:
    """The best value of one validation metric; stops after `patience` evaluations without
    improvement (0: never). Saved in every checkpoint, so a resumed run decides the same."""

    metric: str
    mode: str
    patience: int
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False

    def update(self, step: int, value: float) -> bool:
        """Records one evaluation; returns whether it is a new best."""
        if math.isfinite(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        ):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        self.stopped = bool(self.patience) and self.bad_evals >= self.patience
        return False

    def load(self, saved: dict) -> None:
        if saved.get("metric") != self.metric or saved.get("mode") != self.mode:
            if saved:
                logging.warning("early-stopping metric changed from %s: best reset", saved)
            return
        for key in ("best", "best_step", "bad_evals", "stopped"):
            setattr(self, key, saved.get(key, getattr(self, key)))


class Loop:
    """Runs train steps from the state's step to `num_steps`; see the module docstring."""

    def __init__(
        self, config: Any, workdir: str, writer: Any, ckpt: ckpt_lib.Checkpointer, it: Any
    ):
        self.config, self.workdir, self.writer = config, workdir, writer
        self.ckpt, self.it = ckpt, it
        loop = config.loop
        mode = metric_mode(loop.early_stop_metric, loop.early_stop_mode)
        self.stopper = EarlyStopping(loop.early_stop_metric, mode, loop.early_stop_patience)
        self.last_eval: dict[str, float] = {}
        self._best_unwritten = False
        self._aside = 0.0  # seconds spent in eval and checkpointing since the last progress line

    def load_state(self, saved: dict) -> None:
        """Restores the bookkeeping saved in a checkpoint's JSON (`state()`)."""
        self.stopper.load(saved.get("early_stopping", {}))
        if self.config.ckpt.keep_best:
            self.ckpt.best_step = self.stopper.best_step

    def state(self) -> dict:
        return {"early_stopping": dataclasses.asdict(self.stopper)}

    def run(
        self, state: Any, train_step: Any, num_steps: int, preempt: Preemption, eval_cb: Any
    ) -> Any:
        """Trains to `num_steps` unless preempted or stopped early; returns the last state."""
        start = int(state.step)
        if self.stopper.stopped:
            logging.info("stopped early before, at step %d (%s)", start, self.stopper)
            return state
        cfg, ckpt_every = self.config.loop, self.config.ckpt.every
        window: list[dict[str, float]] = []
        t_window, wait, t_start, pending = time.perf_counter(), 0.0, time.perf_counter(), None
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            batch = next(self.it)
            wait += time.perf_counter() - t0
            state, m = train_step(state, sharding.to_global(batch, _mesh_of(state)))
            done = step + 1
            # Fetch step t-1's metrics while step t runs: this hides the transfer and bounds the
            # number of dispatched-but-unfinished steps to two. Unbounded async dispatch of
            # all-reduce steps over forced host devices hit XLA's collective timeout on 2 cores.
            if pending is not None:
                window.append(self._check(*pending))
            pending = (done, m)
            stop = preempt.should_stop(done)
            evaluate = done == num_steps or bool(cfg.eval_every and done % cfg.eval_every == 0)
            save = evaluate or stop or done % ckpt_every == 0
            log = done % cfg.log_every == 0 or done == num_steps
            if save or log:  # never save or log a step whose loss was not checked
                window.append(self._check(*pending))
                pending = None
            if log:
                elapsed = time.perf_counter() - t_window - self._aside
                self._log(done, num_steps, window, elapsed, wait, start, t_start)
                window, t_window, wait, self._aside = [], time.perf_counter(), 0.0, 0.0
            t_aside = time.perf_counter()
            eval_metrics = self._eval(done, state, eval_cb) if evaluate else None
            if save or self.stopper.stopped:
                self._save(state, done, eval_metrics)
            self._write_best(wait_for_save=False)
            self._aside += time.perf_counter() - t_aside
            if stop:
                logging.warning("SIGTERM received: saved checkpoint at step %d, stopping", done)
                break
            if self.stopper.stopped:
                logging.info(
                    "early stop at step %d: %s has not improved for %d evaluations (best %s at "
                    "step %s)", done, self.stopper.metric, self.stopper.bad_evals,
                    self.stopper.best, self.stopper.best_step,
                )  # fmt: skip
                break
        self._write_best(wait_for_save=True)
        return state

    def _check(self, step: int, m: Any) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(host["loss_sum"]):
            last = self.ckpt.latest_step()
            raise TrainingError(
                f"non-finite loss ({host['loss_sum']}) at step {step}; "
                + ("no checkpoint was saved yet" if last is None else
                   f"the last good checkpoint (step {last}) in {self.ckpt.directory} is kept")
                + ". Lower config.opt.learning_rate or check the data."
            )  # fmt: skip
        return host

    def _save(self, state: Any, step: int, eval_metrics: dict | None) -> None:
        data_state = dict(self.it.get_state(), loop=self.state())
        finite = {k: v for k, v in (eval_metrics or {}).items() if math.isfinite(v)}
        try:
            self.ckpt.save(step, state, data_state, metrics=finite)
        except ckpt_lib.CheckpointError as e:
            raise TrainingError(
                f"parameters became non-finite by step {step} (the loss was still finite): {e}. "
                "The last good checkpoint is kept. Lower config.opt.learning_rate or check the "
                "data."
            ) from e

    def _eval(self, step: int, state: Any, eval_cb: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        m = eval_cb(state.eval_params())  # the moving average where kept
        split = self.config.loop.eval_split
        self.last_eval = {f"{split}/{k}": v for k, v in m.items()}
        summaries = dict(self.last_eval)
        s = self.stopper
        if s.metric:
            if s.metric not in m:  # e.g. a behaviour type absent from this split
                logging.warning("eval %s has no %s; counted as no improvement", split, s.metric)
            if s.update(step, float(m.get(s.metric, math.nan))):
                if self.config.ckpt.keep_best:
                    self.ckpt.best_step = step  # before the save, so that it is never deleted
                self._best_unwritten = True
            summaries[f"{split}/best_{s.metric}"] = s.best if s.best is not None else math.nan
            summaries["early_stop/evals_without_improvement"] = s.bad_evals
        self.writer.scalars(step, summaries)
        self.writer.flush()
        logging.info(
            "eval %s at step %d (%.1fs): %s", split, step, time.perf_counter() - t0,
            metrics.format_metrics(m),
        )  # fmt: skip
        return m

    def _write_best(self, wait_for_save: bool) -> None:
        """Writes WORKDIR/best.json (process 0) once the best step's checkpoint is on disk."""
        if not self._best_unwritten:
            return
        if wait_for_save:
            self.ckpt.wait()
        elif self.ckpt.is_saving():
            return
        self._best_unwritten = False
        s = self.stopper
        record = {
            "step": s.best_step,
            "metric": f"{self.config.loop.eval_split}/{s.metric}",
            "value": s.best,
            "mode": s.mode,
            "checkpoint": os.path.join(self.ckpt.directory, str(s.best_step)),
        }
        ckpt_lib.write_best(self.workdir, record)

    def _log(self, done, num_steps, window, elapsed, wait, start, t_start) -> None:
        m = metrics.reduce_step_metrics(window)
        n = len(window)  # keys without a _sum/count pair are per-step values: average them
        grad_norm, lr = m["grad_norm"] / n, m["learning_rate"] / n
        weights = {k.split("/", 1)[1]: v / n for k, v in m.items() if k.startswith("weights/")}
        weights = without_dropped(weights, self.config.data.get("drop_behaviours") or ())
        elapsed = max(elapsed, 1e-9)
        ex_s = n * self.config.data.batch_size / elapsed
        steps_s = (done - start) / max(time.perf_counter() - t_start, 1e-9)
        eta = (num_steps - done) / max(steps_s, 1e-9)
        behaviour = " ".join(
            f"{k.split('/')[1]}={v:.3f}" for k, v in weights.items() if k.startswith("behaviour/")
        )
        logging.info(
            "step %d/%d loss=%.4f acc=%.4f grad_norm=%.3f lr=%.2e %.0f ex/s input_wait=%.0f%% "
            "ETA %s%s",
            done, num_steps, m["loss"], m["accuracy"], grad_norm, lr, ex_s,
            100 * wait / elapsed, logs.hms(eta),
            f" | behaviour weights {behaviour}" if behaviour else "",
        )  # fmt: skip
        self.writer.scalars(
            done,
            {
                "train/loss": m["loss"],
                "train/accuracy": m["accuracy"],
                "train/grad_norm": grad_norm,
                "train/learning_rate": lr,
                "perf/examples_per_s": ex_s,
                "perf/examples_per_s_per_device": ex_s / jax.device_count(),
                "perf/input_wait_fraction": min(wait / elapsed, 1.0),
                # Seconds per step waiting for the input pipeline vs the rest (dispatch, device
                # compute, metric fetch); evaluation and checkpointing are excluded from both.
                "perf/input_wait_s_per_step": wait / n,
                "perf/compute_s_per_step": max(elapsed - wait, 0.0) / n,
                **{f"influence/{k}": v for k, v in weights.items()},
            },
        )


def without_dropped(weights: dict[str, float], dropped: tuple[str, ...]) -> dict[str, float]:
    """The logged weights without the behaviour types the run drops (`[<head>/]behaviour/<t>`:
    no events, an untrained gate), each group of the others normalised again to sum 1."""
    if not dropped:
        return weights
    group = lambda k: k.rpartition("/")[0]
    is_type = lambda k: group(k).endswith("behaviour")
    kept = {
        k: v for k, v in weights.items() if not (is_type(k) and k.rpartition("/")[2] in dropped)
    }
    totals: dict[str, float] = collections.defaultdict(float)
    for k, v in kept.items():
        if is_type(k):
            totals[group(k)] += v
    return {
        k: v / totals[group(k)] if is_type(k) and totals[group(k)] else v for k, v in kept.items()
    }


def _mesh_of(state: Any) -> jax.sharding.Mesh:
    return jax.tree_util.tree_leaves(state.params)[0].sharding.mesh
