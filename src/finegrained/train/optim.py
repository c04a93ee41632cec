"""The one place that maps config to optimizer groups.

Parameters are named by their '/'-joined path, the same names as
``finegrained.models.params.flatten_state`` (``head/kernel``, ``stage1/0/conv1/kernel``,
...). ``param_groups`` is an ordered list of ``(regex, lr_mult)``; a name takes the
multiplier of the FIRST regex that fully matches it (``re.fullmatch``), else 1.0. A
multiplier of 0 or None freezes the group.

Every transfer regime is a choice of groups, e.g.::

    linear probe          [(r"head/.*", 1.0), (r".*", 0)]
    frozen lower stages   [(r"(stem|stage[12])/.*", 0)]
    per-group fine-tune   [(r"head/.*", 10.0), (r".*", 1.0)]   # or lower mults on early stages
    from scratch          []

Frozen parameters are kept out of the optimizer entirely: the step functions split them
from the trainable ones (see :func:`trainable_filter`), so they get no gradient, no update,
no weight decay and no optimizer state, and stay bit-identical. If a tree that still holds
frozen leaves is handed to :func:`build_optimizer`, they get ``optax.set_to_zero`` (also
stateless), so the mechanism is safe either way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from finegrained.errors import ConfigError

ParamGroups = Sequence[tuple[str, float | None]]
FROZEN = "frozen"
DEFAULT = "default"


def path_name(path: Sequence[Any]) -> str:
    """'/'-joined name of a pytree / nnx path, ignoring attribute hops such as ``.value``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, (jax.tree_util.GetAttrKey, jax.tree_util.FlattenedIndexKey)):
            continue
        else:  # nnx filter paths are plain tuples of str / int
            parts.append(str(key))
    return "/".join(parts)


def param_names(tree: Any) -> Any:
    """A tree like ``tree`` whose leaves are the leaves' '/'-joined names."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), tree)


def is_frozen(lr_mult: float | None) -> bool:
    return lr_mult is None or float(lr_mult) == 0.0


def normalize_groups(param_groups: ParamGroups | None) -> list[tuple[re.Pattern, float | None]]:
    groups = []
    for item in param_groups or ():
        try:
            pattern, mult = item
        except (TypeError, ValueError):
            raise ConfigError(f"param_groups entries are (regex, lr_mult) pairs, got {item!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"bad param_groups regex {pattern!r}: {err}") from err
        if mult is not None and float(mult) < 0:
            raise ConfigError(f"lr_mult must be >= 0 or None (frozen), got {mult!r} for {pattern!r}")
        groups.append((compiled, None if mult is None else float(mult)))
    return groups


def group_index(name: str, param_groups: ParamGroups | None) -> int | None:
    """Index of the first group whose regex fully matches ``name``; None for the default."""
    for i, (pattern, _) in enumerate(normalize_groups(param_groups)):
        if pattern.fullmatch(name):
            return i
    return None


def lr_mult_for(name: str, param_groups: ParamGroups | None) -> float | None:
    groups = normalize_groups(param_groups)
    for pattern, mult in groups:
        if pattern.fullmatch(name):
            return mult
    return 1.0


def group_label(name: str, param_groups: ParamGroups | None) -> str:
    i = group_index(name, param_groups)
    if i is None:
        return DEFAULT
    mult = normalize_groups(param_groups)[i][1]
    return FROZEN if is_frozen(mult) else f"group{i}"


def check_groups(names: Sequence[str], param_groups: ParamGroups | None) -> dict[str, list[str]]:
    """Which names each group takes (first match wins); a regex that takes none is an error,
    since it is almost always a typo that would silently train what should be frozen."""
    groups = normalize_groups(param_groups)
    taken: dict[str, list[str]] = {p.pattern: [] for p, _ in groups}
    taken[DEFAULT] = []
    for name in names:
        i = group_index(name, param_groups)
        taken[DEFAULT if i is None else groups[i][0].pattern].append(name)
    unused = [p.pattern for p, _ in groups if not taken[p.pattern]]
    if unused:
        raise ConfigError(f"param_groups regexes match no parameter: {unused}; "
                          f"names look like {list(names)[:4]}")
    return taken


def trainable_filter(param_groups: ParamGroups | None) -> Callable[[tuple, Any], bool]:
    """An nnx filter ``(path, value) -> bool`` true for Params that are not frozen."""
    from flax import nnx

    def _filter(path, value) -> bool:
        return isinstance(value, nnx.Param) and not is_frozen(
            lr_mult_for(path_name(path), param_groups))

    return _filter


def make_schedule(lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
                  end_lr_fraction: float = 0.0) -> optax.Schedule:
    """'cosine': linear warmup from 0 then cosine decay to ``end_lr_fraction * lr`` at
    ``total_steps``; 'constant': linear warmup then flat."""
    warmup_steps = int(max(0, warmup_steps))
    if schedule == "cosine":
        total_steps = max(int(total_steps), warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
            decay_steps=total_steps, end_value=end_lr_fraction * lr)
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps])
    raise ConfigError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")


def _decay_mask(tree: Any) -> Any:
    # Decay kernels only; biases and BatchNorm scale/bias (1-D) are not decayed.
    return jax.tree_util.tree_map(lambda x: x.ndim > 1, tree)


REGULARIZERS = ("weight_decay", "l2_sp")
#: Parameters of the new classifier, which L2-SP decays toward zero (it has no pretrained
#: values to be pulled back to).
HEAD = re.compile(r"head/.*")


class L2SPState(NamedTuple):
    anchor: Any          # the trained parameters' values when the optimizer was initialised


def l2_sp(alpha: float, beta: float) -> optax.GradientTransformation:
    """L2-SP (Li et al., ICML 2018): adds the gradient of ``alpha/2 |w - w0|^2`` to each
    pretrained kernel's and of ``beta/2 |w|^2`` to each head kernel's gradient (``w0``: the
    value at ``init``, kept in the state, so a resumed run pulls toward the same point).
    Kernels only (ndim > 1), as weight decay; biases and BatchNorm parameters are free."""

    def init(params):
        # A copy of its own: the state must not share buffers with the (donated) params.
        return L2SPState(anchor=jax.tree_util.tree_map(lambda w: jnp.array(w, copy=True),
                                                       params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("l2_sp needs the parameters (optax.chain passes them)")

        def add(path, g, w, w0):
            if w.ndim <= 1:
                return g
            w32 = w.astype(jnp.float32)
            if HEAD.fullmatch(path_name(path)):
                pull = beta * w32
            else:
                pull = alpha * (w32 - w0.astype(jnp.float32))
            return (g.astype(jnp.float32) + pull).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(add, updates, params, state.anchor), state

    return optax.GradientTransformation(init, update)


#: AdamW's moment decay rates (not in the config: the values every recipe here uses).
ADAM_B1, ADAM_B2 = 0.9, 0.999


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """A recipe's optimizer: the schema's recipe keys of the same names (where their one
    default lives; ``TrainSettings.optimizer_settings``)."""

    optimizer: str          # 'momentum' | 'sgd' | 'adamw'
    momentum: float
    nesterov: bool
    weight_decay: float     # toward zero (decoupled for adamw), kernels only
    regularizer: str        # 'weight_decay' | 'l2_sp'
    l2_sp_alpha: float
    l2_sp_beta: float


def _group_transform(lr: Callable, settings: OptimizerSettings) -> optax.GradientTransformation:
    if settings.regularizer not in REGULARIZERS:
        raise ConfigError(f"unknown regularizer {settings.regularizer!r}; use one of "
                          f"{REGULARIZERS}")
    parts, weight_decay = [], settings.weight_decay
    if settings.regularizer == "l2_sp":
        parts.append(l2_sp(settings.l2_sp_alpha, settings.l2_sp_beta))
        weight_decay = 0.0
    if settings.optimizer in ("momentum", "sgd"):
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(lr, momentum=settings.momentum or None,
                               nesterov=settings.nesterov))
        return optax.chain(*parts)
    if settings.optimizer == "adamw":
        return optax.chain(*parts, optax.adamw(lr, b1=ADAM_B1, b2=ADAM_B2,
                                               weight_decay=weight_decay, mask=_decay_mask))
    raise ConfigError(f"unknown optimizer {settings.optimizer!r}; use 'momentum', 'sgd' or "
                      f"'adamw'")


def build_optimizer(params: Any, *, schedule: optax.Schedule, settings: OptimizerSettings,
                    param_groups: ParamGroups | None,
                    check: bool = True) -> optax.GradientTransformation:
    """One optax transformation for ``params`` (any pytree: nnx.State or nested dicts).

    Each group gets the same optimizer with the learning rate ``schedule`` (the run's, built
    once by :func:`make_schedule`) scaled by its ``lr_mult`` (and so its decoupled weight
    decay for adamw); frozen groups get ``set_to_zero``. Weight decay applies to kernels
    (ndim > 1) only; ``regularizer='l2_sp'`` replaces it with :func:`l2_sp` toward the
    values ``params`` hold at ``init``. ``check`` raises on regexes that match no name in
    ``params`` (turn off when ``params`` holds only the trainable part).
    """
    groups = normalize_groups(param_groups)
    if check:
        check_groups(jax.tree_util.tree_leaves(param_names(params)), param_groups)

    def scaled(mult: float) -> Callable:
        return lambda step: mult * schedule(step)

    transforms = {DEFAULT: _group_transform(scaled(1.0), settings),
                  FROZEN: optax.set_to_zero()}
    for i, (_, mult) in enumerate(groups):
        if not is_frozen(mult):
            transforms[f"group{i}"] = _group_transform(scaled(mult), settings)

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: group_label(path_name(p), param_groups), tree)

    return optax.multi_transform(transforms, labels)
