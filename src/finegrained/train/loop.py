"""The training loop: epochs of seeded shuffled batches through the jitted step, with
checkpoints, resume, preemption and non-finite guards.

``fit`` reads in one sitting: :func:`prepare` (state, steps, schedule for the settings),
then per epoch :func:`run_epoch` (the steps, checkpointing and guarding as they go), the
validation pass and :func:`end_epoch` (the history row, the best weights, early stopping,
the epoch's checkpoint). It starts from the model's current values (or a checkpoint) and
returns the final ``TrainState``. The step itself is ``steps.train_step_fn``; the batches
come from ``input_pipeline``; the checkpoints are ``checkpoint``'s.

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

from finegrained.errors import ConfigError
from finegrained.models.params import flatten_state
from finegrained.selection import better
from finegrained.train import local_sgd, optim
from finegrained.train.augment import Lighting
from finegrained.train.checkpoint import (Checkpointer, Preempted, Progress, StopFlag,
                                          restore_checkpoint, save_checkpoint)
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


class NonFinite(RuntimeError):
    """The training loss, or a parameter, statistic or optimizer moment, became NaN or
    infinite; the run stops at once, before any such value reaches a checkpoint."""


@dataclasses.dataclass
class Run:
    """What :func:`prepare` builds for one run: the state on the mesh and the steps."""

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
    #: The state validation and exported weights use: ``state`` itself, or with local SGD
    #: the mean of its per-device copies.
    evaluated: Callable[[TrainState], TrainState]
    #: A host copy of ``state`` (a restored checkpoint) back on the mesh as ``state`` is.
    place: Callable[[Any], TrainState]
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
    run = prepare(model, len(train_source), settings, mesh=mesh, lighting=lighting)
    eval_batch = round_up(settings.eval_batch_size or settings.batch_size, run.mesh.devices.size)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    progress, best_weights = Progress(), None
    if ckpt is not None:
        restored = restore_checkpoint(ckpt, run.state, lambda: flatten_state(model), log)
        if restored is not None:
            state, progress, best_weights = restored
            run.state = run.place(jax.tree_util.tree_map(jnp.asarray, state))
            log(f"{label}: resumed from checkpoint at step {progress.step}")
    first_epoch_here = True
    epochs = min(settings.epochs, stop_after_epochs or settings.epochs)
    try:
        with StopFlag() as stop:
            while not progress.done and progress.step < run.steps_per_epoch * epochs:
                epoch = progress.step // run.steps_per_epoch
                run_epoch(run, train_source, epoch, progress, label=label, ckpt=ckpt,
                          best_weights=best_weights, stop=stop, log=log)
                check_state(run, label, epoch + 1, progress.step, ckpt)
                t_eval = time.perf_counter()
                val = (validate(run.evaluated(run.state), val_source, run.eval_metrics,
                                eval_batch, run.mesh, settings.prefetch_batches)
                       if val_source is not None else None)
                record = epoch_record(run, epoch, progress, val)
                record["eval_seconds"] = time.perf_counter() - t_eval
                if first_epoch_here:          # the startup of this process
                    record["first_step_seconds"] = run.first_step_seconds
                    first_epoch_here = False
                best_weights = end_epoch(run, progress, record, best_weights, ckpt)
                log(f"{label} " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))
                if stop.agreed(f"epoch{epoch}"):
                    raise Preempted(f"{label}: SIGTERM during epoch {epoch + 1}; checkpoint "
                                    f"written at its end (step {progress.step}), rerun to resume")
    finally:
        if ckpt is not None:
            ckpt.close()

    # Back to single-device arrays so the caller's model does not stay tied to the mesh.
    nnx.update(model, *jax.tree_util.tree_map(jnp.asarray, host_weights(run)))
    return FitResult(progress.history, run.state, progress.best, best_weights,
                     stopped_early=progress.done)


def prepare(model: nnx.Module, num_train: int, settings: TrainSettings, *, mesh=None,
            lighting: Lighting | None = None) -> Run:
    """The train state on the mesh (replicated), the jitted steps and the schedule."""
    started = time.perf_counter()
    mesh = mesh if mesh is not None else make_mesh(settings.num_devices)
    check_batch_size(settings.batch_size, mesh)
    steps_per_epoch = num_train // settings.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {settings.batch_size} exceeds the {num_train} "
                          f"training examples (the last partial batch is dropped)")
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = int(round(settings.warmup_epochs * steps_per_epoch))
    schedule = optim.make_schedule(settings.lr, settings.schedule, total_steps, warmup_steps,
                                   settings.end_lr_fraction)
    state = create_train_state(
        model, param_groups=settings.param_groups, lr=settings.lr, schedule=settings.schedule,
        total_steps=total_steps, warmup_steps=warmup_steps, weight_decay=settings.weight_decay,
        optimizer=settings.optimizer, momentum=settings.momentum, nesterov=settings.nesterov,
        end_lr_fraction=settings.end_lr_fraction, regularizer=settings.regularizer,
        l2_sp_alpha=settings.l2_sp_alpha, l2_sp_beta=settings.l2_sp_beta,
        precision=settings.precision)
    # Donated train state: the step updates it in place (a CPU cannot donate; no warning).
    donate = jax.default_backend() != "cpu"
    options = settings.step_options()
    if settings.parallel.local:
        state = local_sgd.stack_copies(state, mesh)
        train_step = local_sgd.make_local_sgd_step(options, settings.parallel, mesh,
                                                   lighting=lighting, schedule=schedule,
                                                   donate=donate)
        evaluated = local_sgd.make_mean_of_copies(mesh)
        place = functools.partial(local_sgd.place, mesh=mesh)
    else:
        state = replicate(state, mesh)
        train_step = make_train_step(options, lighting=lighting, schedule=schedule, mesh=mesh,
                                     donate=donate)
        evaluated, place = (lambda s: s), functools.partial(replicate, mesh=mesh)
    eval_metrics = make_eval_metrics_step(options, mesh=mesh)
    group_lrs = {f"lr:{pattern}": mult for pattern, mult in settings.param_groups}
    return Run(settings, mesh, state, train_step, eval_metrics, schedule, steps_per_epoch,
               num_train, group_lrs, started, evaluated, place)


def run_epoch(run: Run, source: Any, epoch: int, progress: Progress, *, label: str,
              ckpt: Checkpointer | None, best_weights: dict | None, stop: StopFlag,
              log: Callable[[str], None]) -> None:
    """Steps of ``epoch`` (0-based) from where ``progress`` stands. Checks each step's loss
    (one step behind, so dispatch stays asynchronous), checkpoints every
    ``checkpoint_every_steps`` and on SIGTERM (then raises :class:`Preempted`)."""
    settings, steps_per_epoch = run.settings, run.steps_per_epoch
    labels = np.asarray(source.labels, np.int32)
    done_before = progress.step - epoch * steps_per_epoch     # steps of a resumed epoch
    batches = epoch_batches(len(source), settings.batch_size, settings.seed, epoch)[done_before:]
    step_key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    rows = local_rows(settings.batch_size, run.mesh)       # this process's part of each batch

    def load(indices):
        indices = indices[rows]
        return shard_batch({"image": source.gather(indices), "label": labels[indices]},
                           run.mesh, settings.batch_size)

    bar = _progress_bar(steps_per_epoch, f"{label} epoch {epoch + 1}/{settings.epochs}")
    if bar is not None:
        bar.update(done_before)
    prefetch = Prefetcher(batches, load, settings.prefetch_batches)
    t0, pending = time.perf_counter(), None

    def settle() -> None:
        """Fetch the pending step's metrics, check its loss, record it."""
        nonlocal pending
        if pending is None:
            return
        metrics, step = jax.device_get(pending[0]), pending[1]
        pending = None
        loss = _check_loss(metrics, label, epoch + 1, step, ckpt)
        progress.epoch_metrics.append([loss, float(metrics["accuracy"])])

    def elapsed() -> tuple[float, float]:
        return time.perf_counter() - t0, prefetch.wait_seconds

    try:
        for batch in prefetch:
            rng = jax.random.fold_in(step_key, progress.step)
            run.state, metrics = run.train_step(run.state, batch, rng)
            if run.first_step_seconds is None:
                run.first_step_seconds = time.perf_counter() - run.started
            settle()                      # the previous step, while this one runs
            progress.step += 1
            pending = (metrics, progress.step)
            every = settings.checkpoint_every_steps
            mid_epoch = progress.step % steps_per_epoch != 0   # epoch ends: after validation
            stopping = stop.agreed(progress.step)
            if mid_epoch and ((every and progress.step % every == 0) or stopping):
                settle()
                check_state(run, label, epoch + 1, progress.step, ckpt)
                seconds, wait = elapsed()
                save_checkpoint(ckpt, run.state, dataclasses.replace(
                    progress, epoch_seconds=progress.epoch_seconds + seconds,
                    epoch_wait=progress.epoch_wait + wait), best_weights)
                if stopping:
                    raise Preempted(f"{label}: SIGTERM at epoch {epoch + 1}, step "
                                    f"{progress.step}; checkpoint written, rerun to resume")
            if bar is not None:
                bar.update(1)
                if progress.epoch_metrics:    # the previous step's loss (no extra sync)
                    seconds, _ = elapsed()
                    steps_here = progress.step - epoch * steps_per_epoch - done_before
                    bar.set_postfix(loss=f"{progress.epoch_metrics[-1][0]:.4f}",
                                    img_s=f"{steps_here * settings.batch_size / seconds:.0f}")
            elif settings.log_every_steps and progress.step % settings.log_every_steps == 0:
                settle()
                loss, acc = progress.epoch_metrics[-1]
                log(f"{label} epoch {epoch + 1} step {progress.step}/"
                    f"{steps_per_epoch * settings.epochs} loss {loss:.4f} acc {acc:.3f}")
        settle()
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
    seconds, wait = elapsed()
    progress.epoch_seconds += seconds
    progress.epoch_wait += wait


def epoch_record(run: Run, epoch: int, progress: Progress, val: dict | None) -> dict:
    """The history row of an epoch just run (and validated)."""
    metrics = np.asarray(progress.epoch_metrics, np.float64)
    seconds = max(progress.epoch_seconds, 1e-9)
    copies = run.mesh.devices.size if run.settings.parallel.local else 1
    record = {"epoch": epoch + 1, "step": progress.step, **run.lrs(progress.step - 1),
              "train_count": run.num_train, "train_loss": float(metrics[:, 0].mean()),
              "train_top1": float(metrics[:, 1].mean()),
              # one copy's storage of the trained parameters and the optimizer state
              "param_bytes": nbytes(run.state.params) // copies,
              "opt_state_bytes": nbytes(run.state.opt_state) // copies,
              "communication_rounds": run.settings.parallel.communication_rounds(progress.step)}
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_count=val["count"])
    record.update(images_per_second=len(metrics) * run.settings.batch_size / seconds,
                  seconds=seconds, input_wait_fraction=progress.epoch_wait / seconds)
    return record


def host_weights(run: Run) -> tuple:
    """Trained parameters, frozen parameters and statistics on the host, the parameters as
    float32 whatever their storage (bfloat16 widens exactly): what weights files hold."""
    state = run.evaluated(run.state)
    params, frozen, stats = jax.device_get((state.params, state.frozen, state.stats))
    return cast_floats(params, np.float32), frozen, stats


def end_epoch(run: Run, progress: Progress, record: dict, best_weights: dict | None,
              ckpt: Checkpointer | None) -> dict | None:
    """Book an epoch: its row, the best weights so far (``select_by``), early stopping
    (``patience``), the epoch's checkpoint. Returns the best weights."""
    progress.history.append(record)
    if "val_top1" in record:
        if better(record, progress.best, run.settings.select_by):
            progress.best, progress.stale_epochs = record, 0
            best_weights = flatten_state(nnx.merge(run.state.graphdef, *host_weights(run)))
        else:
            progress.stale_epochs += 1
        if run.settings.patience and progress.stale_epochs >= run.settings.patience:
            progress.done = True
    progress.epoch_metrics, progress.epoch_seconds, progress.epoch_wait = [], 0.0, 0.0
    save_checkpoint(ckpt, run.state, progress, best_weights)
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


def check_state(run: Run, label: str, epoch: int, step: int,
                ckpt: Checkpointer | None) -> None:
    """Raise :class:`NonFinite` unless every trained parameter, statistic and optimizer
    moment is finite. The loss the loop reads is the loss *before* a step's update, so an
    update that overflows shows only here; called before every checkpoint and epoch end."""
    state = (run.state.params, run.state.stats, run.state.opt_state)
    if not bool(jax.device_get(_all_finite(state))):
        raise NonFinite(f"{label}: non-finite parameters after epoch {epoch}, step {step} (the "
                        f"update diverged; lower the learning rate); stopped ({_kept(ckpt)})")


def _progress_bar(total: int, desc: str):
    """A tqdm bar on a terminal (steps, loss, images/s); None in logs."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


__all__: Sequence[str] = ("FitResult", "NonFinite", "Preempted", "Run", "TIMING_FIELDS",
                          "check_state", "end_epoch", "epoch_record", "fit", "prepare",
                          "run_epoch")
