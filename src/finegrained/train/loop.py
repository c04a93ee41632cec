"""The training loop: epochs of seeded shuffled batches through the jitted steps, fed by a
background input thread, with checkpoints, resume, preemption and non-finite guards.

Sources are objects with ``len()``, ``labels`` (int [N]) and ``gather(indices) -> array``:
``ShardReader`` (uint8 pixels), ``FeatureReader`` (cached float features) or
:class:`ArraySource`. The loop owns the data order, a permutation per (seed, epoch), so a
run resumed at step ``s`` reads exactly the batches an uninterrupted run reads from ``s``
on, and draws the same augmentation (the step's key is ``fold_in(key(seed), step)``).

``fit`` is built from small pieces: :func:`prepare` (state, steps, schedule for a config),
:func:`run_epoch` (one epoch of steps, checkpointing and guarding as it goes) and
:func:`evaluate` (one pass over a split, sums kept on the device). It starts from the
model's current values (or a checkpoint) and returns the final ``TrainState``.

With several processes (:mod:`finegrained.distributed`) the mesh spans all of them, each
process loads only its rows of every batch, and a SIGTERM stops every process at the same
step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained import distributed
from finegrained.errors import ConfigError
from finegrained.models.params import flatten_state
from finegrained.train import optim
from finegrained.train.augment import AugmentConfig, Lighting
from finegrained.train.checkpoint import Checkpointer
from finegrained.train.sharding import (check_batch_size, local_rows, make_mesh, replicate,
                                        shard_batch)
from finegrained.train.steps import (StepConfig, TrainState, create_train_state,
                                     make_eval_metrics_step, make_train_step)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (all transfer regimes differ only in these values).

    The pipeline builds it with :meth:`from_dict` from the resolved settings of a job; the
    defaults here equal the config schema's (a test keeps them equal).
    """

    epochs: int = 30
    batch_size: int = 256                 # global batch; a multiple of the device count
    eval_batch_size: int | None = None    # default: batch_size
    base_lr: float = 0.1
    schedule: str = "cosine"              # 'cosine' (with warmup) | 'constant'
    warmup_epochs: float = 1.0
    end_lr_fraction: float = 0.0
    optimizer: str = "momentum"           # 'momentum' | 'sgd' | 'adamw'
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    patience: int = 0                     # early stop after this many epochs without gain
    param_groups: tuple[tuple[str, float | None], ...] = ()   # (regex, lr_mult); 0/None frozen
    augment: AugmentConfig = AugmentConfig()
    compute_dtype: str = "bfloat16"       # or 'float32'
    image_size: int = 224                 # crop side fed to the model
    eval_crop_fraction: float = 0.875
    seed: int = 0
    num_devices: int | None = None        # None: all local devices
    log_every_steps: int = 50             # 0: log once per epoch (off a terminal)
    checkpoint_every_steps: int = 500     # 0: at epoch ends only (with a checkpoint dir)
    prefetch_batches: int = 3
    start: str | None = None              # inputs are the output of this stage (a cache)
    cut: str | None = None                # frozen part run online up to this stage

    def step_config(self) -> StepConfig:
        return StepConfig(image_size=self.image_size, eval_crop_fraction=self.eval_crop_fraction,
                          augment=self.augment, label_smoothing=self.label_smoothing,
                          compute_dtype=self.compute_dtype, start=self.start, cut=self.cut)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields: {sorted(unknown)}")
        if "augment" in d and not isinstance(d["augment"], AugmentConfig):
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        if "param_groups" in d:
            d["param_groups"] = tuple((str(p), None if m is None else float(m))
                                      for p, m in d["param_groups"])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class NonFinite(RuntimeError):
    """The training loss, or a parameter, statistic or optimizer moment, became NaN or
    infinite; the run stops at once, before any such value reaches a checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM arrived (SLURM preemption or time limit); a checkpoint was written."""


# ---------------------------------------------------------------------------- data sources

class ArraySource:
    """In-memory ``(images, labels)`` with the source interface of the loop."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = np.asarray(images), np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices)]


def as_source(source: Any):
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return ArraySource(*source)
    if hasattr(source, "gather") and hasattr(source, "labels"):
        return source
    raise TypeError(f"expected a source (len, labels, gather) or (images, labels), "
                    f"got {type(source)}")


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent shuffling seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index arrays of one training epoch: a seeded permutation cut into full batches
    (the last partial batch is dropped)."""
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
    steps = n // batch_size
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


class Prefetcher:
    """Runs ``load(item)`` for each item of ``items`` on a background thread, at most
    ``depth`` results ahead of the consumer (a bounded queue). ``load`` assembles a batch
    and puts it on the device, so the training thread only dispatches steps.
    ``wait_seconds`` is the time the consumer spent blocked waiting for input."""

    _END = object()

    def __init__(self, items: Iterable, load: Callable[[Any], Any], depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._work, args=(iter(items), load),
                                        daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterator, load: Callable) -> None:
        try:
            for item in items:
                if self._stop.is_set() or not self._put(("ok", load(item))):
                    return
            self._put(("end", None))
        except BaseException as exc:   # handed to the consumer, raised there
            self._put(("error", exc))

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            kind, value = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------- evaluation

def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def evaluate(state: TrainState, source: Any, eval_metrics: Callable, batch_size: int,
             mesh=None, depth: int = 3) -> dict:
    """Top-1 and mean cross-entropy over every example of ``source`` exactly once.

    The last batch is padded to ``batch_size`` (static shapes, divisible by the devices)
    and masked out of every count. Batches are prepared ahead on the input thread; the
    per-batch sums stay on the device and are fetched once at the end. With several
    processes each one reads only its rows of every batch.
    """
    source = as_source(source)
    n, labels = len(source), np.asarray(source.labels, np.int32)
    rows = local_rows(batch_size, mesh) if mesh is not None else slice(None)

    def load(start):
        positions = np.arange(start, start + batch_size)[rows]
        idx = positions[positions < n]
        # A process whose rows are all padding still needs the image shape: one row, cut.
        images = source.gather(idx) if len(idx) else source.gather(np.zeros(1, np.int64))[:0]
        y = labels[idx]
        pad = len(positions) - len(idx)
        mask = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            y = np.concatenate([y, np.zeros(pad, np.int32)])
        batch = {"image": images, "label": y, "mask": mask}
        return (shard_batch(batch, mesh, batch_size) if mesh is not None
                else jax.device_put(batch))

    sums = []
    prefetch = Prefetcher(range(0, n, batch_size), load, depth)
    try:
        for batch in prefetch:
            sums.append(eval_metrics(state, batch))
    finally:
        prefetch.close()
    sums = jax.device_get(sums)
    correct = float(sum(float(s["correct"]) for s in sums))
    loss = float(sum(float(s["loss"]) for s in sums))
    count = int(round(sum(float(s["count"]) for s in sums)))
    return {"top1": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}


# ---------------------------------------------------------------------------- pieces of fit

@dataclasses.dataclass
class Run:
    """What :func:`prepare` builds for one config: the state on the mesh and the steps."""

    cfg: TrainConfig
    mesh: Any
    state: TrainState
    train_step: Callable
    eval_metrics: Callable
    schedule: Callable
    steps_per_epoch: int
    lighting: Lighting | None
    group_lrs: dict[str, float | None]    # column name -> lr multiplier
    started: float = dataclasses.field(default_factory=time.perf_counter)
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


def prepare(model: nnx.Module, num_train: int, cfg: TrainConfig, *, mesh=None,
            lighting: Lighting | None = None) -> Run:
    started = time.perf_counter()
    mesh = mesh if mesh is not None else make_mesh(cfg.num_devices)
    check_batch_size(cfg.batch_size, mesh)
    steps_per_epoch = num_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {num_train} "
                          f"training examples (the last partial batch is dropped)")
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = optim.make_schedule(cfg.base_lr, cfg.schedule, total_steps, warmup_steps,
                                   cfg.end_lr_fraction)
    state = create_train_state(
        model, param_groups=cfg.param_groups, base_lr=cfg.base_lr, schedule=cfg.schedule,
        total_steps=total_steps, warmup_steps=warmup_steps, weight_decay=cfg.weight_decay,
        optimizer=cfg.optimizer, momentum=cfg.momentum, nesterov=cfg.nesterov,
        end_lr_fraction=cfg.end_lr_fraction)
    state = replicate(state, mesh)
    donate = jax.default_backend() != "cpu"   # CPU cannot donate; avoid the warning
    train_step = make_train_step(cfg.step_config(), lighting=lighting, schedule=schedule,
                                 mesh=mesh, donate=donate)
    eval_metrics = make_eval_metrics_step(cfg.step_config(), mesh=mesh)
    group_lrs = {f"lr:{pattern}": mult for pattern, mult in cfg.param_groups}
    return Run(cfg, mesh, state, train_step, eval_metrics, schedule, steps_per_epoch,
               lighting, group_lrs, started=started)


def _kept(ckpt: Checkpointer | None) -> str:
    step = ckpt.latest_step() if ckpt is not None else None
    return ("no checkpoint was written" if step is None else
            f"the last good checkpoint, step {step}, is kept") + ", no weights were written"


def _check_finite(metrics: Mapping, label: str, epoch: int, step: int,
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


def check_state(run: "Run", label: str, epoch: int, step: int,
                ckpt: Checkpointer | None) -> None:
    """Raise :class:`NonFinite` unless every trained parameter, statistic and optimizer
    moment is finite. The loss the loop reads is the loss *before* a step's update, so an
    update that overflows shows only here; called before every checkpoint and epoch end."""
    state = (run.state.params, run.state.rest, run.state.opt_state)
    if not bool(jax.device_get(_all_finite(state))):
        raise NonFinite(f"{label}: non-finite parameters after epoch {epoch}, step {step} (the "
                        f"update diverged; lower the learning rate); stopped ({_kept(ckpt)})")


class _StopFlag:
    """SIGTERM -> a flag the loop checks between steps (then checkpoint and stop).

    With several processes the signal may reach each at a different step, so the loop asks
    :meth:`agreed`: every process stops at the same step if any of them got it."""

    _fits = itertools.count()    # every process runs the same fits, in the same order

    def __init__(self):
        self.set = False
        self._previous = None
        self._fit = next(self._fits)

    def agreed(self, tag) -> bool:
        return distributed.any_process(self.set, f"stop/{self._fit}/{tag}")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Progress:
    """The loop's bookkeeping, saved as JSON in every checkpoint."""

    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    epoch_metrics: list = dataclasses.field(default_factory=list)   # [loss, acc] per step
    epoch_seconds: float = 0.0
    epoch_wait: float = 0.0
    best: dict | None = None        # the history row of the best validation epoch
    stale_epochs: int = 0           # epochs since the best (early stopping)
    done: bool = False


def _state_arrays(run: Run, best: dict | None) -> dict:
    s = run.state
    arrays = {"step": s.step, "params": s.params, "rest": s.rest, "opt_state": s.opt_state}
    if best is not None:
        arrays["best"] = best
    return arrays


def save_checkpoint(ckpt: Checkpointer | None, run: Run, progress: Progress,
                    best_flat: dict | None) -> None:
    if ckpt is None:
        return
    meta = dataclasses.asdict(progress)
    ckpt.save(progress.step, _state_arrays(run, best_flat), meta)


def restore_checkpoint(ckpt: Checkpointer, run: Run, model: nnx.Module
                       ) -> tuple[Progress, dict | None] | None:
    step = ckpt.latest_step()
    if step is None:
        return None
    meta = ckpt.restore_meta(step)
    best_like = flatten_state(model) if meta.get("best") is not None else None
    arrays = ckpt.restore_arrays(step, _state_arrays(run, best_like))
    state = run.state.replace(step=arrays["step"], params=arrays["params"],
                              rest=arrays["rest"], opt_state=arrays["opt_state"])
    run.state = replicate(jax.tree_util.tree_map(jax.numpy.asarray, state), run.mesh)
    return Progress(**meta), arrays.get("best")


def _flat_of_state(state: TrainState) -> dict:
    host = jax.device_get((state.params, state.frozen, state.rest))
    module = nnx.merge(state.graphdef, *host)
    return flatten_state(module)


def _progress_bar(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:    # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def run_epoch(run: Run, source: Any, epoch: int, progress: Progress, *, label: str,
              ckpt: Checkpointer | None, best_flat: dict | None, stop: _StopFlag,
              log: Callable[[str], None]) -> None:
    """Steps of ``epoch`` (0-based) from where ``progress`` stands. Checks each step's loss
    (one step behind, so dispatch stays asynchronous), checkpoints every
    ``checkpoint_every_steps`` and on SIGTERM (then raises :class:`Preempted`)."""
    cfg, spe = run.cfg, run.steps_per_epoch
    labels = np.asarray(source.labels, np.int32)
    first = progress.step - epoch * spe
    batches = epoch_batches(len(source), cfg.batch_size, cfg.seed, epoch)[first:]
    step_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    rows = local_rows(cfg.batch_size, run.mesh)      # this process's part of each batch

    def load(idx):
        idx = idx[rows]
        return shard_batch({"image": source.gather(idx), "label": labels[idx]}, run.mesh,
                           cfg.batch_size)

    bar = _progress_bar(spe, f"{label} epoch {epoch + 1}/{cfg.epochs}")
    if bar is not None:
        bar.update(first)
    prefetch = Prefetcher(batches, load, cfg.prefetch_batches)
    t0, pending = time.perf_counter(), None

    def settle() -> None:
        """Fetch the pending step's metrics, check its loss, record it."""
        nonlocal pending
        if pending is None:
            return
        metrics, step = jax.device_get(pending[0]), pending[1]
        pending = None
        loss = _check_finite(metrics, label, epoch + 1, step, ckpt)
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
            every = cfg.checkpoint_every_steps
            mid_epoch = progress.step % spe != 0      # epoch ends checkpoint after eval
            stopping = stop.agreed(progress.step)
            if mid_epoch and ((every and progress.step % every == 0) or stopping):
                settle()
                check_state(run, label, epoch + 1, progress.step, ckpt)
                seconds, wait = elapsed()
                saved = dataclasses.replace(progress, epoch_seconds=progress.epoch_seconds + seconds,
                                            epoch_wait=progress.epoch_wait + wait)
                save_checkpoint(ckpt, run, saved, best_flat)
                if stopping:
                    raise Preempted(f"{label}: SIGTERM at epoch {epoch + 1}, step "
                                    f"{progress.step}; checkpoint written, rerun to resume")
            if bar is not None:
                bar.update(1)
                if progress.epoch_metrics:    # the previous step's loss (no extra sync)
                    seconds, _ = elapsed()
                    done = progress.step - epoch * spe - first
                    bar.set_postfix(loss=f"{progress.epoch_metrics[-1][0]:.4f}",
                                    img_s=f"{done * cfg.batch_size / seconds:.0f}")
            elif cfg.log_every_steps and progress.step % cfg.log_every_steps == 0:
                settle()
                loss, acc = progress.epoch_metrics[-1]
                log(f"{label} epoch {epoch + 1} step {progress.step}/{spe * cfg.epochs} "
                    f"loss {loss:.4f} acc {acc:.3f}")
        settle()
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
    seconds, wait = elapsed()
    progress.epoch_seconds += seconds
    progress.epoch_wait += wait


def _epoch_record(run: Run, epoch: int, progress: Progress, val: dict | None) -> dict:
    cfg = run.cfg
    metrics = np.asarray(progress.epoch_metrics, np.float64)
    seconds = max(progress.epoch_seconds, 1e-9)
    record = {"epoch": epoch + 1, "step": progress.step, **run.lrs(progress.step - 1),
              "train_loss": float(metrics[:, 0].mean()), "train_top1": float(metrics[:, 1].mean())}
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_count=val["count"])
    record.update(images_per_second=len(metrics) * cfg.batch_size / seconds,
                  seconds=seconds, input_wait_fraction=progress.epoch_wait / seconds)
    return record


TIMING_FIELDS = ("images_per_second", "seconds", "input_wait_fraction", "first_step_seconds",
                 "wall_seconds", "eval_seconds")


@dataclasses.dataclass
class FitResult:
    history: list[dict]
    state: TrainState
    best: dict | None            # history row of the best validation epoch
    best_weights: dict | None    # flat weights (host) at that epoch
    stopped_early: bool = False


def fit(model: nnx.Module, train_source: Any, val_source: Any | None, cfg: TrainConfig, *,
        log_fn: Callable[[str], None] | None = print, lighting: Lighting | None = None,
        mesh=None, checkpoint_dir=None, label: str = "train") -> FitResult:
    """Train ``model`` (starting from its current values) with ``cfg``.

    With ``checkpoint_dir``, resumes from the latest checkpoint there (bit-identically:
    same data order, same augmentation, same state), checkpoints every
    ``cfg.checkpoint_every_steps`` and at every epoch end, and on SIGTERM checkpoints and
    raises :class:`Preempted`. A non-finite loss, or a non-finite parameter before a
    checkpoint or at an epoch end, raises :class:`NonFinite` naming ``label``, epoch and
    step; no checkpoint ever holds a non-finite value. The model is updated in place with the final state.
    History rows: epoch, step, lr (+ ``lr:<regex>`` per group), train_loss, train_top1,
    val_loss, val_top1, val_count, images_per_second, seconds, input_wait_fraction.
    """
    log = log_fn or (lambda _: None)
    train_source = as_source(train_source)
    run = prepare(model, len(train_source), cfg, mesh=mesh, lighting=lighting)
    eval_bs = _round_up(cfg.eval_batch_size or cfg.batch_size, run.mesh.devices.size)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    progress, best_flat = Progress(), None
    if ckpt is not None:
        restored = restore_checkpoint(ckpt, run, model)
        if restored is not None:
            progress, best_flat = restored
            log(f"{label}: resumed from checkpoint at step {progress.step}")
    startup_reported = False
    try:
        with _StopFlag() as stop:
            while not progress.done and progress.step < run.steps_per_epoch * cfg.epochs:
                epoch = progress.step // run.steps_per_epoch
                run_epoch(run, train_source, epoch, progress, label=label, ckpt=ckpt,
                          best_flat=best_flat, stop=stop, log=log)
                check_state(run, label, epoch + 1, progress.step, ckpt)
                t_eval = time.perf_counter()
                val = (evaluate(run.state, val_source, run.eval_metrics, eval_bs, run.mesh,
                                cfg.prefetch_batches) if val_source is not None else None)
                record = _epoch_record(run, epoch, progress, val)
                record["eval_seconds"] = time.perf_counter() - t_eval
                if not startup_reported:    # the first epoch this process ran
                    record["first_step_seconds"] = run.first_step_seconds
                    startup_reported = True
                progress.history.append(record)
                if val is not None:
                    if progress.best is None or val["top1"] > progress.best["val_top1"]:
                        progress.best, progress.stale_epochs = record, 0
                        best_flat = _flat_of_state(run.state)
                    else:
                        progress.stale_epochs += 1
                    if cfg.patience and progress.stale_epochs >= cfg.patience:
                        progress.done = True
                progress.epoch_metrics, progress.epoch_seconds, progress.epoch_wait = [], 0.0, 0.0
                save_checkpoint(ckpt, run, progress, best_flat)
                log(f"{label} " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))
                if stop.agreed(f"epoch{epoch}"):
                    raise Preempted(f"{label}: SIGTERM during epoch {epoch + 1}; checkpoint "
                                    f"written at its end (step {progress.step}), rerun to resume")
    finally:
        if ckpt is not None:
            ckpt.close()

    # Back to single-device arrays so the caller's model does not stay tied to the mesh.
    host = jax.device_get((run.state.params, run.state.frozen, run.state.rest))
    nnx.update(model, *jax.tree_util.tree_map(jax.numpy.asarray, host))
    return FitResult(progress.history, run.state, progress.best, best_flat,
                     stopped_early=progress.done)


__all__: Sequence[str] = ("TrainConfig", "ArraySource", "as_source", "evaluate", "fit",
                          "epoch_seed", "epoch_batches", "Prefetcher", "FitResult",
                          "NonFinite", "Preempted", "TIMING_FIELDS", "check_state")
