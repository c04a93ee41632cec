"""Pure step functions: ``train_step(state, batch, rng) -> (state, metrics)`` and
``eval_step(state, batch) -> logits``, each jitted once; the loop lives in ``loop.py``.

NNX pattern: functional split/merge under plain ``jax.jit``. The model is split once into
``graphdef`` (static structure) and three ``nnx.State`` pytrees: trainable params, frozen
params and the statistics (every non-Param variable: BatchNorm's running mean and
variance). The step merges them into a throw-away
module inside the traced function, runs it, and splits the new statistics back out. Why not
``nnx.jit``: the state is then an ordinary pytree, so (1) the step is a pure function of
its inputs as big_vision/flax-imagenet write it, (2) ``jax.jit``'s ``in_shardings`` /
``out_shardings`` with ``NamedSharding`` declare data parallelism directly (batch split on
'data', state replicated) with no module-level sharding annotations, (3) gradients are taken
with respect to the trainable State only, so frozen groups get no gradient, no optimizer
state and stay bit-identical, and (4) there is no per-call graph traversal of a Python
object. Batches are dicts ``{"image": uint8 [B, S, S, 3], "label": int [B]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from finegrained.errors import ConfigError
from finegrained.train import optim
from finegrained.train.augment import Augmentation, Lighting, augment_batch, center_crop
from finegrained.train import precision as low_precision
from finegrained.plan.augment import is_augmented
from finegrained.train.precision import Precision
from finegrained.train.sharding import data_sharding, replicated

# No float16: it needs loss scaling (small gradients underflow), which the step does not do.
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes. ``graphdef`` and ``tx`` are static (not leaves)."""

    step: jax.Array
    params: nnx.State       # trainable nnx.Param leaves
    frozen: nnx.State       # nnx.Param leaves whose group lr_mult is 0 / None
    stats: nnx.State        # every other variable: BatchNorm's running mean and variance
    opt_state: Any
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def merge(self) -> nnx.Module:
        """A module holding this state (for export: ``nnx.update(model, ...)`` or flatten)."""
        return nnx.merge(self.graphdef, self.params, self.frozen, self.stats)


def split_model(model: nnx.Module, param_groups: optim.ParamGroups | None):
    """``graphdef, trainable, frozen, statistics`` for the groups (see ``optim``)."""
    all_names = [optim.path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    optim.check_groups(all_names, param_groups)
    return nnx.split(model, optim.trainable_filter(param_groups), nnx.Param, ...)


def create_train_state(model: nnx.Module, *, param_groups: optim.ParamGroups | None,
                       schedule: optax.Schedule, optimizer: optim.OptimizerSettings,
                       precision: Precision) -> TrainState:
    """Split ``model`` by ``param_groups`` and build the optimizer for the trainable part
    (the run's learning-rate ``schedule``, built once), the trained parameters and the
    optimizer state stored at ``precision``."""
    graphdef, params, frozen, stats = split_model(model, param_groups)
    tx = optim.build_optimizer(params, schedule=schedule, settings=optimizer,
                               param_groups=param_groups, check=False)
    if not precision.full:
        tx = low_precision.with_state_dtype(tx, precision)
        params = low_precision.store(params, precision)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, stats=stats,
                      opt_state=tx.init(params), graphdef=graphdef, tx=tx)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step functions do besides the optimizer (static under jit); built from a
    run's settings (``TrainSettings.step_options``)."""

    image_size: int                      # side of the crop fed to the model
    eval_crop_fraction: float            # centre crop for evaluation (see augment.center_crop)
    augment: Augmentation
    label_smoothing: float
    compute_dtype: str                   # 'auto' | 'float32' | 'bfloat16' (params stay float32)
    # Batches hold the output of stage ``start`` (cached features/activations, float) instead
    # of pixels; no augmentation or cropping is applied to them. None: uint8 pixels.
    start: str | None
    # Frozen lower part run online: the activation after stage ``cut`` is cut off from the
    # gradient (the frozen part is a fixed function of the input). None: no cut.
    cut: str | None
    # Storage of the trained parameters and optimizer state between steps (the update is
    # computed in float32; bfloat16 parameters are rounded as ``precision.rounding`` says).
    precision: Precision


def training_view(images: jax.Array, rng: jax.Array, options: StepOptions,
                  lighting: Lighting | None = None) -> jax.Array:
    """What the network sees of a training batch: cached inputs as they are, pixels
    augmented, or (augmentation off) the deterministic evaluation view."""
    if options.start is not None:
        return images
    if not is_augmented(options.augment):
        return center_crop(images, options.image_size, options.eval_crop_fraction)
    return augment_batch(images, rng, options.augment, options.image_size, lighting)


def evaluation_view(images: jax.Array, options: StepOptions) -> jax.Array:
    if options.start is not None:
        return images
    return center_crop(images, options.image_size, options.eval_crop_fraction)


#: Backends whose matrix units run bfloat16 at several times the float32 rate; on a CPU,
#: bfloat16 convolutions are emulated and slower than float32.
BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype_name(name: str, backend: str | None = None) -> str:
    """``'auto'`` resolved for ``backend`` (default: JAX's): bfloat16 on GPUs and TPUs,
    float32 on CPUs; other names as they are."""
    if name != "auto":
        return name
    return "bfloat16" if (backend or jax.default_backend()) in BF16_BACKENDS else "float32"


def resolve_compute_dtype(name: str):
    """The jnp dtype for ``StepOptions.compute_dtype`` ('auto' by backend); ConfigError for
    anything but 'auto', 'float32' and 'bfloat16'."""
    name = compute_dtype_name(name)
    if name == "float16":
        raise ConfigError("compute_dtype 'float16' is not supported (it would need loss "
                          "scaling); use 'bfloat16' (or 'float32')")
    if name not in _DTYPES:
        raise ConfigError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def set_compute_dtype(model: nnx.Module, dtype) -> None:
    """Mixed precision the flax way: every module with a ``dtype`` attribute (the
    backbone's input normalisation, Conv, Linear, BatchNorm, ...) computes in ``dtype``
    while parameters keep their ``param_dtype`` (float32); BatchNorm still reduces
    statistics in float32 and keeps float32 running averages."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = dtype


def freeze_frozen_batch_norms(model: nnx.Module, frozen: nnx.State) -> None:
    """BatchNorm layers whose parameters are all frozen run on their running statistics and
    do not update them: a frozen stage is frozen as a function (linear probe, frozen lower
    stages, cached boundary activations), not re-normalised by the target data."""
    frozen_paths = {tuple(path) for path, _ in nnx.to_flat_state(frozen)}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            own = [(*path, name) for name in ("scale", "bias")
                   if getattr(module, name, None) is not None]
            if own and all(p in frozen_paths for p in own):
                module.use_running_average = True


#: The stream of a step's rng that draws the model's own randomness (a ViT's drop path).
MODEL_STREAM = 9


def _forward(graphdef, params, frozen, stats, images: jax.Array, *, train: bool, dtype,
             start: str | None = None, cut: str | None = None, key=None):
    """Logits (float32) and the new non-Param state. ``key``: randomness of the stages that
    draw any in train mode (a ViT's drop path); the frozen part before ``cut`` gets none.

    ``copy=True`` makes fresh Variables at the current trace level (inside ``jax.grad``);
    without it flax 0.12 refuses the BatchNorm statistics update ("Cannot mutate BatchStat
    from a different trace level"). Mode and compute dtype are set on this throw-away
    module only, so the state and graphdef in TrainState never change. The model
    normalises its (float32) input itself and casts to the compute dtype afterwards.
    """
    model = nnx.merge(graphdef, params, frozen, stats, copy=True)
    model.train() if train else model.eval()
    if train:
        freeze_frozen_batch_norms(model, frozen)
    if dtype != jnp.float32:
        set_compute_dtype(model, dtype)
    if cut is not None and cut != start:
        images = jax.lax.stop_gradient(model.forward(images, start=start, stop=cut))
        start = cut
    random = {"key": key} if key is not None and getattr(model, "takes_key", False) else {}
    if start is None:
        logits = model(images, **random)
    else:
        logits = model.forward(jnp.asarray(images).astype(dtype), start=start, **random)
    logits = logits.astype(jnp.float32)
    return logits, nnx.state(model, nnx.Not(nnx.Param))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step_fn(state: TrainState, batch: dict, rng: jax.Array, *, options: StepOptions,
                  lighting: Lighting | None = None,
                  schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
    """Augment on device -> forward in train mode -> loss -> grads -> optimizer update."""
    images = training_view(batch["image"], rng, options, lighting)
    return update_step(state, images, batch["label"], rng, options=options, schedule=schedule)


def update_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array, *,
                options: StepOptions,
                schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
    """One optimizer update on views already made: forward in train mode -> loss -> grads
    -> update (stored at ``options.precision``; ``rng`` draws its stochastic rounding)."""
    dtype = resolve_compute_dtype(options.compute_dtype)

    def loss_fn(params, frozen, stats):
        logits, new_stats = _forward(state.graphdef, params, frozen, stats, images, train=True,
                                    dtype=dtype, start=options.start, cut=options.cut,
                                    key=jax.random.fold_in(rng, MODEL_STREAM))
        loss = jnp.mean(cross_entropy(logits, labels, options.label_smoothing))
        return loss, (logits, new_stats)

    precision = options.precision
    # Low-precision storage: forward, gradients and update in float32 on the widened weights.
    params = (state.params if precision.full
              else low_precision.cast_floats(state.params, jnp.float32))
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.frozen, state.stats)
    updates, opt_state = state.tx.update(grads, state.opt_state, params)
    if precision.full:
        params = optax.apply_updates(params, updates)
    else:
        params = low_precision.apply_updates(
            state.params, updates, precision,
            jax.random.fold_in(rng, low_precision.ROUNDING_STREAM))
    metrics = {"loss": loss,
               "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, stats=new_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step_fn(state: TrainState, batch: dict, *, options: StepOptions) -> jax.Array:
    """Logits (float32) of the centre-cropped batch in eval mode (running BatchNorm stats)."""
    dtype = resolve_compute_dtype(options.compute_dtype)
    images = evaluation_view(batch["image"], options)
    logits, _ = _forward(state.graphdef, state.params, state.frozen, state.stats, images,
                         train=False, dtype=dtype, start=options.start)
    return logits


def eval_metrics_fn(state: TrainState, batch: dict, *, options: StepOptions) -> dict:
    """Summed correct count and cross-entropy over the batch's valid rows (``batch['mask']``):
    evaluation stays on the device and the host fetches the sums once per pass."""
    logits = eval_step_fn(state, batch, options=options)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    loss = cross_entropy(logits, labels)
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}


def make_train_step(options: StepOptions, *, lighting: Lighting | None = None,
                    schedule: optax.Schedule | None = None, mesh=None,
                    donate: bool = False) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, jitted. With a ``mesh``, the
    batch is split over its 'data' axis and state/metrics are replicated (explicit
    shardings); XLA inserts the gradient all-reduce."""
    resolve_compute_dtype(options.compute_dtype)   # refuse a bad dtype now, not at the first call

    def step(state, batch, rng):
        return train_step_fn(state, batch, rng, options=options, lighting=lighting,
                             schedule=schedule)

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if mesh is not None:
        rep, dat = replicated(mesh), data_sharding(mesh)
        kwargs.update(in_shardings=(rep, dat, rep), out_shardings=(rep, rep))
    return jax.jit(step, **kwargs)


def make_eval_metrics_step(options: StepOptions, *, mesh=None) -> Callable:
    """``eval_metrics(state, batch) -> {correct, loss, count}`` sums, jitted (replicated)."""
    def step(state, batch):
        return eval_metrics_fn(state, batch, options=options)

    kwargs = {}
    if mesh is not None:
        kwargs.update(in_shardings=(replicated(mesh), data_sharding(mesh)),
                      out_shardings=replicated(mesh))
    return jax.jit(step, **kwargs)


def make_eval_step(options: StepOptions, *, mesh=None) -> Callable:
    """``eval_step(state, batch) -> logits``, jitted; logits sharded like the batch."""
    resolve_compute_dtype(options.compute_dtype)

    def step(state, batch):
        return eval_step_fn(state, batch, options=options)

    kwargs = {}
    if mesh is not None:
        kwargs.update(in_shardings=(replicated(mesh), data_sharding(mesh)),
                      out_shardings=data_sharding(mesh))
    return jax.jit(step, **kwargs)
