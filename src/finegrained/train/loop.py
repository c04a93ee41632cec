"""The training loop: epochs of seeded shuffled batches through the jitted step, with
checkpoints, resume, preemption and non-finite guards.

:func:`fit` reads in one sitting: :func:`prepare` (the state on the mesh, the jitted steps,
the learning-rate schedule), :func:`resume` (a checkpoint, if any), then per epoch its steps
(``training.train_step``, which is ``steps.train_step``, each booked by :class:`EpochSteps`:
loss checked, checkpoints, progress), the validation pass and :func:`end_epoch` (the
history row, the best weights, early stopping, the epoch's checkpoint). The batches come
from ``input_pipeline``; the checkpoints are ``checkpoint``'s.

The data order is a permutation per (seed, epoch) and each step's augmentation key is
``fold_in(key(seed), step)``, so a run resumed at step ``s`` reads the batches and draws the
augmentation an uninterrupted run does from ``s`` on. With several processes
(:mod:`finegrained.distributed`) the mesh spans all of them, each process loads only its
rows of every batch, and a SIGTERM stops every process at the same step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained.errors import ConfigError, Everywhere
from finegrained.models.params import flatten_state
from finegrained.plan.selection import better
from finegrained.train import local_sgd, optim
from finegrained.train.augment import Lighting
from finegrained.train.checkpoint import (Checkpointer, Preempted, Progress, StopFlag,
                                          restore_checkpoint, run_layout, save_checkpoint)
from finegrained.train.input_pipeline import Prefetcher, as_source, epoch_batches
from finegrained.train.precision import cast_floats, nbytes
from finegrained.train.settings import TrainSettings
from finegrained.train.sharding import (check_batch_size, local_rows, make_mesh, replicate,
                                        shard_batch)
from finegrained.train.steps import (TrainState, create_train_state, make_eval_metrics_step,
                                     make_train_step)
from finegrained.train.validation import round_up, validate

#: History columns that measure time, not the result (a resumed run differs only in them).
TIMING_FIELDS = ("images_per_second", "seconds", "input_wait_fraction", "first_step_seconds",
                 "wall_seconds", "eval_seconds")


class NonFinite(Everywhere, RuntimeError):
    """The training loss, or a parameter, statistic or optimizer moment, became NaN or
    infinite; the run stops at once, before any such value reaches a checkpoint."""


@dataclasses.dataclass
class Training:
    """What :func:`prepare` builds for one run: the state on the mesh, the steps, the
    schedule."""

    settings: TrainSettings
    mesh: Any
    state: TrainState
    train_step: Callable
    eval_metrics: Callable
    schedule: Callable
    steps_per_epoch: int
    num_train: int                        # training examples (the epoch's data)
    group_lrs: dict[str, float | None]    # history column name -> lr multiplier
    started: float
    #: The model validation sees and the weights files hold, from ``state``: the state
    #: itself, or with local SGD the mean of its per-device copies.
    averaged: Callable[[TrainState], TrainState]
    #: A host copy of ``state`` (a restored checkpoint) put back on the mesh as ``state`` is.
    to_mesh: Callable[[Any], TrainState]
    #: Seconds from :func:`prepare` to the return of this process's first step (tracing and
    #: compiling it, or loading it from the persistent compilation cache); None until then.
    first_step_seconds: float | None = None

    def lrs(self, step: int) -> dict[str, float]:
        """Learning rate of every trained group at ``step`` (``lr`` is the base group's)."""
        base = float(self.schedule(step))
        out = {"lr": base}
        for name, mult in self.group_lrs.items():
            out[name] = 0.0 if optim.is_frozen(mult) else base * float(mult)
        return out


@dataclasses.dataclass
class FitResult:
    history: list[dict]
    state: TrainState
    best: dict | None            # history row of the best validation epoch
    best_weights: dict | None    # flat weights (host) at that epoch
    stopped_early: bool = False


def fit(model: nnx.Module, train_source: Any, val_source: Any | None,
        settings: TrainSettings, *, log_fn: Callable[[str], None] | None = print,
        lighting: Lighting | None = None, mesh=None, checkpoint_dir=None,
        label: str = "train", stop_after_epochs: int | None = None) -> FitResult:
    """Train ``model`` (starting from its current values) with ``settings``.

    ``stop_after_epochs`` ends the run after that many epochs of the schedule planned for
    ``settings.epochs`` (a refit repeating a chosen epoch). Without ``val_source`` no
    validation runs: no best row, no best weights, no early stopping.

    With ``checkpoint_dir``, resumes from the newest checkpoint there that reads whole (an
    unreadable one is set aside and logged; bit-identically: same data order, same
    augmentation, same state), checkpoints every
    ``settings.checkpoint_every_steps`` and at every epoch end, and on SIGTERM checkpoints
    and raises :class:`Preempted`. A non-finite loss, or a non-finite parameter before a
    checkpoint or at an epoch end, raises :class:`NonFinite` naming ``label``, epoch and
    step; no checkpoint ever holds a non-finite value. The model is updated in place with
    the final state. History rows: epoch, step, lr (+ ``lr:<regex>`` per group),
    train_count, train_loss, train_top1, param_bytes, opt_state_bytes (``precision``),
    communication_rounds (``parallel``), val_loss, val_top1, val_count, and the
    :data:`TIMING_FIELDS`. With ``parallel.mode: local_sgd`` validation and the weights
    use the mean of the per-device copies. The best epoch is chosen by ``settings.select_by``.
    """
    log = log_fn or (lambda _: None)
    train_source = as_source(train_source)
    training = prepare(model, len(train_source), settings, mesh=mesh, lighting=lighting)
    eval_batch = round_up(settings.eval_batch_size or settings.batch_size,
                          training.mesh.devices.size)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    progress, best_weights = resume(training, ckpt, model, label, log)
    step_key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    epochs = min(settings.epochs, stop_after_epochs or settings.epochs)
    first_epoch_here = True
    try:
        with StopFlag() as stop:
            while not progress.done and progress.step < training.steps_per_epoch * epochs:
                epoch = progress.step // training.steps_per_epoch
                with EpochSteps(training, train_source, epoch, progress, label=label,
                                ckpt=ckpt, stop=stop, log=log) as steps:
                    for batch in steps.batches:
                        rng = jax.random.fold_in(step_key, progress.step)
                        training.state, metrics = training.train_step(training.state, batch,
                                                                      rng)
                        steps.book(metrics, best_weights)
                check_state(training, label, epoch + 1, progress.step, ckpt)
                t_eval = time.perf_counter()
                val = (validate(training.averaged(training.state), val_source,
                                training.eval_metrics, eval_batch, training.mesh,
                                settings.prefetch_batches)
                       if val_source is not None else None)
                record = epoch_record(training, epoch, progress, val)
                record["eval_seconds"] = time.perf_counter() - t_eval
                if first_epoch_here:          # the startup of this process
                    record["first_step_seconds"] = training.first_step_seconds
                    first_epoch_here = False
                best_weights = end_epoch(training, progress, record, best_weights, ckpt)
                log(f"{label} " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))
                if stop.agreed(f"epoch{epoch}"):
                    raise Preempted(f"{label}: SIGTERM during epoch {epoch + 1}; checkpoint "
                                    f"written at its end (step {progress.step}), rerun to resume")
    finally:
        if ckpt is not None:
            ckpt.close()

    # Back to single-device arrays so the caller's model does not stay tied to the mesh.
    nnx.update(model, *jax.tree_util.tree_map(jnp.asarray, host_weights(training)))
    return FitResult(progress.history, training.state, progress.best, best_weights,
                     stopped_early=progress.done)


def prepare(model: nnx.Module, num_train: int, settings: TrainSettings, *, mesh=None,
            lighting: Lighting | None = None) -> Training:
    """The train state on the mesh (replicated), the jitted steps and the schedule."""
    started = time.perf_counter()
    mesh = mesh if mesh is not None else make_mesh(settings.num_devices)
    check_batch_size(settings.batch_size, mesh)
    steps_per_epoch = num_train // settings.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {settings.batch_size} exceeds the {num_train} "
                          f"training examples (the last partial batch is dropped)")
    schedule = optim.make_schedule(
        settings.lr, settings.schedule, steps_per_epoch * settings.epochs,
        int(round(settings.warmup_epochs * steps_per_epoch)), settings.end_lr_fraction)
    state = create_train_state(model, param_groups=settings.param_groups, schedule=schedule,
                               optimizer=settings.optimizer_settings(),
                               precision=settings.precision)
    # Donated train state: the step updates it in place (a CPU cannot donate; no warning).
    donate = jax.default_backend() != "cpu"
    options = settings.step_options()
    if settings.parallel.local:
        state = local_sgd.stack_copies(state, mesh)
        train_step = local_sgd.make_local_sgd_step(options, settings.parallel, mesh,
                                                   lighting=lighting, schedule=schedule,
                                                   donate=donate)
        averaged = local_sgd.make_mean_of_copies(mesh)
        to_mesh = functools.partial(local_sgd.place, mesh=mesh)
    else:
        state = replicate(state, mesh)
        train_step = make_train_step(options, lighting=lighting, schedule=schedule, mesh=mesh,
                                     donate=donate)
        averaged, to_mesh = (lambda s: s), functools.partial(replicate, mesh=mesh)
    eval_metrics = make_eval_metrics_step(options, mesh=mesh)
    group_lrs = {f"lr:{pattern}": mult for pattern, mult in settings.param_groups}
    return Training(settings, mesh, state, train_step, eval_metrics, schedule, steps_per_epoch,
                    num_train, group_lrs, started, averaged, to_mesh)


def resume(training: Training, ckpt: Checkpointer | None, model: nnx.Module, label: str,
           log: Callable[[str], None]) -> tuple[Progress, dict | None]:
    """The progress and best weights of the latest checkpoint (its state put on the mesh),
    or a fresh start. A checkpoint of another layout (processes, devices) is refused."""
    layout = run_layout(training.mesh)
    if ckpt is not None:
        restored = restore_checkpoint(ckpt, training.state, lambda: flatten_state(model), log,
                                      layout)
        if restored is not None:
            state, progress, best_weights = restored
            training.state = training.to_mesh(jax.tree_util.tree_map(jnp.asarray, state))
            log(f"{label}: resumed from checkpoint at step {progress.step}")
            return dataclasses.replace(progress, **layout), best_weights
    return Progress(**layout), None


class EpochSteps:
    """The machinery around the steps of one epoch (0-based) from where ``progress``
    stands: the batches (this process's rows of each, loaded ahead on a thread), each
    step's loss fetched one step behind (so dispatch stays asynchronous) and checked,
    checkpoints every ``checkpoint_every_steps`` and on SIGTERM (then :class:`Preempted`),
    the progress bar or log lines, and the epoch's time."""

    def __init__(self, training: Training, source: Any, epoch: int, progress: Progress, *,
                 label: str, ckpt: Checkpointer | None, stop: StopFlag,
                 log: Callable[[str], None]):
        settings = self.settings = training.settings
        self.training, self.epoch, self.progress = training, epoch, progress
        self.label, self.ckpt, self.stop, self.log = label, ckpt, stop, log
        labels = np.asarray(source.labels, np.int32)
        # steps of this epoch a resumed run has done already
        self.done_before = progress.step - epoch * training.steps_per_epoch
        order = epoch_batches(len(source), settings.batch_size, settings.seed,
                              epoch)[self.done_before:]
        rows = local_rows(settings.batch_size, training.mesh)   # this process's part

        def load(indices):
            indices = indices[rows]
            return shard_batch({"image": source.gather(indices), "label": labels[indices]},
                               training.mesh, settings.batch_size)

        self.bar = _progress_bar(training.steps_per_epoch,
                                 f"{label} epoch {epoch + 1}/{settings.epochs}")
        if self.bar is not None:
            self.bar.update(self.done_before)
        self.batches = Prefetcher(order, load, settings.prefetch_batches)
        self.t0, self.pending = time.perf_counter(), None

    def __enter__(self) -> "EpochSteps":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            if kind is None:
                self.settle()
        finally:
            self.batches.close()
            if self.bar is not None:
                self.bar.close()
        if kind is None:
            seconds, wait = self.elapsed()
            self.progress.epoch_seconds += seconds
            self.progress.epoch_wait += wait

    def book(self, metrics: Mapping, best_weights: dict | None) -> None:
        """A step just dispatched: the previous step's loss checked while it runs, the step
        counted, a checkpoint if one is due (and :class:`Preempted` after a SIGTERM's), the
        progress shown."""
        training, progress, settings = self.training, self.progress, self.settings
        if training.first_step_seconds is None:
            training.first_step_seconds = time.perf_counter() - training.started
        self.settle()
        progress.step += 1
        self.pending = (metrics, progress.step)
        every = settings.checkpoint_every_steps
        mid_epoch = progress.step % training.steps_per_epoch != 0   # epoch ends: after val
        stopping = self.stop.agreed(progress.step)
        if mid_epoch and ((every and progress.step % every == 0) or stopping):
            self.settle()
            check_state(training, self.label, self.epoch + 1, progress.step, self.ckpt)
            seconds, wait = self.elapsed()
            save_checkpoint(self.ckpt, training.state, dataclasses.replace(
                progress, epoch_seconds=progress.epoch_seconds + seconds,
                epoch_wait=progress.epoch_wait + wait), best_weights)
            if stopping:
                raise Preempted(f"{self.label}: SIGTERM at epoch {self.epoch + 1}, step "
                                f"{progress.step}; checkpoint written, rerun to resume")
        self.show()

    def settle(self) -> None:
        """Fetch the pending step's metrics, check its loss, record it."""
        if self.pending is None:
            return
        metrics, step = jax.device_get(self.pending[0]), self.pending[1]
        self.pending = None
        loss = _check_loss(metrics, self.label, self.epoch + 1, step, self.ckpt)
        self.progress.epoch_metrics.append([loss, float(metrics["accuracy"])])

    def show(self) -> None:
        """The progress bar on a terminal, else a log line every ``log_every_steps``."""
        progress, settings = self.progress, self.settings
        if self.bar is not None:
            self.bar.update(1)
            if progress.epoch_metrics:    # the previous step's loss (no extra sync)
                seconds, _ = self.elapsed()
                steps_here = (progress.step - self.epoch * self.training.steps_per_epoch
                              - self.done_before)
                self.bar.set_postfix(loss=f"{progress.epoch_metrics[-1][0]:.4f}",
                                     img_s=f"{steps_here * settings.batch_size / seconds:.0f}")
        elif settings.log_every_steps and progress.step % settings.log_every_steps == 0:
            self.settle()
            loss, acc = progress.epoch_metrics[-1]
            self.log(f"{self.label} epoch {self.epoch + 1} step {progress.step}/"
                     f"{self.training.steps_per_epoch * settings.epochs} loss {loss:.4f} "
                     f"acc {acc:.3f}")

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, self.batches.wait_seconds


def epoch_record(training: Training, epoch: int, progress: Progress,
                 val: dict | None) -> dict:
    """The history row of an epoch just run (and validated)."""
    metrics = np.asarray(progress.epoch_metrics, np.float64)
    seconds = max(progress.epoch_seconds, 1e-9)
    copies = training.mesh.devices.size if training.settings.parallel.local else 1
    record = {"epoch": epoch + 1, "step": progress.step, **training.lrs(progress.step - 1),
              "train_count": training.num_train, "train_loss": float(metrics[:, 0].mean()),
              "train_top1": float(metrics[:, 1].mean()),
              # one copy's storage of the trained parameters and the optimizer state
              "param_bytes": nbytes(training.state.params) // copies,
              "opt_state_bytes": nbytes(training.state.opt_state) // copies,
              "communication_rounds": training.settings.parallel.communication_rounds(progress.step)}
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_count=val["count"])
    record.update(images_per_second=len(metrics) * training.settings.batch_size / seconds,
                  seconds=seconds, input_wait_fraction=progress.epoch_wait / seconds)
    return record


def host_weights(training: Training) -> tuple:
    """Trained parameters, frozen parameters and statistics on the host, the parameters as
    float32 whatever their storage (bfloat16 widens exactly): what weights files hold."""
    state = training.averaged(training.state)
    params, frozen, stats = jax.device_get((state.params, state.frozen, state.stats))
    return cast_floats(params, np.float32), frozen, stats


def end_epoch(training: Training, progress: Progress, record: dict, best_weights: dict | None,
              ckpt: Checkpointer | None) -> dict | None:
    """Book an epoch: its row, the best weights so far (``select_by``), early stopping
    (``patience``), the epoch's checkpoint. Returns the best weights."""
    progress.history.append(record)
    if "val_top1" in record:
        if better(record, progress.best, training.settings.select_by):
            progress.best, progress.stale_epochs = record, 0
            best_weights = flatten_state(nnx.merge(training.state.graphdef, *host_weights(training)))
        else:
            progress.stale_epochs += 1
        if training.settings.patience and progress.stale_epochs >= training.settings.patience:
            progress.done = True
    progress.epoch_metrics, progress.epoch_seconds, progress.epoch_wait = [], 0.0, 0.0
    save_checkpoint(ckpt, training.state, progress, best_weights)
    return best_weights


# ---------------------------------------------------------------------------- guards

def _kept(ckpt: Checkpointer | None) -> str:
    step = ckpt.latest_step() if ckpt is not None else None
    return ("no checkpoint was written" if step is None else
            f"the last good checkpoint, step {step}, is kept") + ", no weights were written"


def _check_loss(metrics: Mapping, label: str, epoch: int, step: int,
                ckpt: Checkpointer | None) -> float:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFinite(f"{label}: non-finite training loss {loss} at epoch {epoch}, "
                        f"step {step}; stopped ({_kept(ckpt)})")
    return loss


@jax.jit
def _all_finite(tree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def check_state(training: Training, label: str, epoch: int, step: int,
                ckpt: Checkpointer | None) -> None:
    """Raise :class:`NonFinite` unless every trained parameter, statistic and optimizer
    moment is finite. The loss the loop reads is the loss *before* a step's update, so an
    update that overflows shows only here; called before every checkpoint and epoch end."""
    state = (training.state.params, training.state.stats, training.state.opt_state)
    if not bool(jax.device_get(_all_finite(state))):
        raise NonFinite(f"{label}: non-finite parameters after epoch {epoch}, step {step} (the "
                        f"update diverged; lower the learning rate); stopped ({_kept(ckpt)})")


def _progress_bar(total: int, desc: str):
    """A tqdm bar on a terminal (steps, loss, images/s), drawn by process 0 only; None in
    logs."""
    if not sys.stderr.isatty() or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


__all__: Sequence[str] = ("EpochSteps", "FitResult", "NonFinite", "Preempted", "TIMING_FIELDS",
                          "Training", "check_state", "end_epoch", "epoch_record", "fit",
                          "prepare", "resume")
