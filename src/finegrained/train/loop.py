"""The training loop: epochs of seeded shuffled batches through the jitted steps, per-epoch
metrics, and an evaluation that sees every validation image exactly once.

Sources are ``ShardReader``-like objects (``len()``, ``iter_batches(batch_size, shuffle,
seed, drop_remainder)``) or plain ``(images, labels)`` arrays. Everything that changes
behaviour is in :class:`TrainConfig`; the loop only logs and counts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from finegrained.errors import ConfigError
from finegrained.train.augment import AugmentConfig, Lighting
from finegrained.train.optim import make_schedule
from finegrained.train.sharding import check_batch_size, make_mesh, replicate, shard_batch
from finegrained.train.steps import (StepConfig, TrainState, create_train_state,
                                     make_eval_step, make_train_step)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (all transfer regimes differ only in these values)."""

    epochs: int = 10
    batch_size: int = 64                  # global batch; a multiple of the device count
    eval_batch_size: int | None = None    # default: batch_size
    base_lr: float = 0.1
    schedule: str = "cosine"              # 'cosine' (with warmup) | 'constant'
    warmup_epochs: float = 0.0
    end_lr_fraction: float = 0.0
    optimizer: str = "momentum"           # 'momentum' | 'sgd' | 'adamw'
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    param_groups: tuple[tuple[str, float | None], ...] = ()   # (regex, lr_mult); 0/None frozen
    augment: AugmentConfig = AugmentConfig()
    compute_dtype: str = "float32"        # or 'bfloat16'
    image_size: int = 224                 # crop side fed to the model
    eval_crop_fraction: float = 0.875
    seed: int = 0
    num_devices: int | None = None        # None: all local devices
    log_every_steps: int = 0              # 0: log once per epoch

    def step_config(self) -> StepConfig:
        return StepConfig(image_size=self.image_size, eval_crop_fraction=self.eval_crop_fraction,
                          augment=self.augment, label_smoothing=self.label_smoothing,
                          compute_dtype=self.compute_dtype)

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


# ---------------------------------------------------------------------------- data sources

class ArraySource:
    """In-memory ``(images, labels)`` with the ShardReader batching interface."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = np.asarray(images), np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                     drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = (np.random.default_rng(seed).permutation(len(self)) if shuffle
                 else np.arange(len(self)))
        stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.images[idx], self.labels[idx]


def as_source(source: Any):
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return ArraySource(*source)
    if hasattr(source, "iter_batches"):
        return source
    raise TypeError(f"expected a ShardReader-like object or (images, labels), got {type(source)}")


def _as_xy(item: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, Mapping):
        image = item["image"] if "image" in item else item["images"]
        label = item["label"] if "label" in item else item["labels"]
        return np.asarray(image), np.asarray(label)
    image, label = item[:2]
    return np.asarray(image), np.asarray(label)


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent shuffling seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ---------------------------------------------------------------------------- evaluation

def evaluate(state: TrainState, source: Any, eval_step: Callable, batch_size: int,
             mesh=None) -> dict:
    """Top-1 and mean cross-entropy over every example of ``source`` exactly once.

    The last batch is padded to ``batch_size`` (static shapes, divisible by the devices) and
    the padding is masked out of every count.
    """
    source = as_source(source)
    correct, loss_sum, count = 0, 0.0, 0
    for item in source.iter_batches(batch_size, shuffle=False, seed=0, drop_remainder=False):
        images, labels = _as_xy(item)
        n = len(labels)
        if n < batch_size:
            pad = batch_size - n
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels_padded = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
        else:
            labels_padded = labels
        batch = {"image": images, "label": labels_padded.astype(np.int32)}
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        logits = np.asarray(jax.device_get(eval_step(state, batch)), np.float64)
        valid = np.arange(batch_size) < n
        logits, y = logits[valid], labels.astype(np.int64)
        correct += int(np.sum(np.argmax(logits, -1) == y))
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        loss_sum += float(-logp[np.arange(n), y].sum())
        count += n
    return {"top1": correct / max(count, 1), "loss": loss_sum / max(count, 1), "count": count}


# ---------------------------------------------------------------------------- fit

def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def fit(model: nnx.Module, train_source: Any, val_source: Any | None, cfg: TrainConfig, *,
        log_fn: Callable[[str], None] | None = print, lighting: Lighting | None = None,
        mesh=None) -> list[dict]:
    """Train ``model`` in place with ``cfg``; return one metrics dict per epoch.

    Each dict: epoch, step, lr, train_loss, train_acc, train_images_per_second,
    epoch_seconds, and (with a val source) val_top1, val_loss, val_count.
    """
    log = log_fn or (lambda _: None)
    train_source = as_source(train_source)
    mesh = mesh if mesh is not None else make_mesh(cfg.num_devices)
    n_dev = mesh.devices.size
    check_batch_size(cfg.batch_size, mesh)
    eval_bs = _round_up(cfg.eval_batch_size or cfg.batch_size, n_dev)

    steps_per_epoch = len(train_source) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(train_source)} "
                          f"training examples (the last partial batch is dropped)")
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    opt_kwargs = dict(base_lr=cfg.base_lr, schedule=cfg.schedule, total_steps=total_steps,
                      warmup_steps=warmup_steps, weight_decay=cfg.weight_decay,
                      optimizer=cfg.optimizer, momentum=cfg.momentum, nesterov=cfg.nesterov,
                      end_lr_fraction=cfg.end_lr_fraction)
    schedule = make_schedule(cfg.base_lr, cfg.schedule, total_steps, warmup_steps,
                             cfg.end_lr_fraction)
    state = create_train_state(model, param_groups=cfg.param_groups, **opt_kwargs)
    state = replicate(state, mesh)
    donate = jax.default_backend() != "cpu"   # CPU cannot donate; avoid the warning
    train_step = make_train_step(cfg.step_config(), lighting=lighting, schedule=schedule,
                                 mesh=mesh, donate=donate)
    eval_step = make_eval_step(cfg.step_config(), mesh=mesh)
    step_rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)

    history: list[dict] = []
    global_step = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        metrics: list[dict] = []
        for item in train_source.iter_batches(cfg.batch_size, shuffle=True,
                                              seed=epoch_seed(cfg.seed, epoch),
                                              drop_remainder=True):
            images, labels = _as_xy(item)
            batch = shard_batch({"image": images, "label": labels.astype(np.int32)}, mesh)
            rng = jax.random.fold_in(step_rng, global_step)
            state, m = train_step(state, batch, rng)
            metrics.append(m)
            global_step += 1
            if cfg.log_every_steps and global_step % cfg.log_every_steps == 0:
                m = jax.device_get(m)
                log(f"step {global_step}/{total_steps} loss {float(m['loss']):.4f} "
                    f"acc {float(m['accuracy']):.3f} lr {float(m['lr']):.5f}")
        metrics = jax.device_get(metrics)   # one sync per epoch
        train_seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1, "step": global_step,
            "lr": float(metrics[-1]["lr"]),
            "train_loss": float(np.mean([m["loss"] for m in metrics])),
            "train_acc": float(np.mean([m["accuracy"] for m in metrics])),
            "train_images_per_second": len(metrics) * cfg.batch_size / train_seconds,
        }
        if val_source is not None:
            ev = evaluate(state, val_source, eval_step, eval_bs, mesh)
            record.update(val_top1=ev["top1"], val_loss=ev["loss"], val_count=ev["count"])
        record["epoch_seconds"] = time.perf_counter() - t0
        history.append(record)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in record.items()))

    # Back to single-device arrays so the caller's model does not stay tied to the mesh.
    host = jax.device_get((state.params, state.frozen, state.rest))
    nnx.update(model, *jax.tree_util.tree_map(jax.numpy.asarray, host))
    return history


__all__: Sequence[str] = ("TrainConfig", "ArraySource", "as_source", "evaluate", "fit",
                          "epoch_seed")
