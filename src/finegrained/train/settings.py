"""The settings of one training run (``fit``): every knob, and nothing but what the config
schema says.

All transfer regimes differ only in these values. The workflow resolves them for each job
from the validated config (:func:`finegrained.plan.regimes.job_settings`: recipe keys,
run keys, parameter groups, where the inputs come from) and a job builds
:class:`TrainSettings` with :meth:`TrainSettings.from_dict`. No field has a default here:
the schema is the one place a default lives, and :func:`default_settings` reads them from it
(for code that trains outside the workflow: tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from finegrained.errors import ConfigError
from finegrained.train.augment import Augmentation
from finegrained.train.local_sgd import Parallel
from finegrained.train.optim import OptimizerSettings
from finegrained.train.precision import Precision
from finegrained.train.steps import StepOptions


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every knob of one training run; the fields are the schema's recipe keys
    (``$defs/recipe``) and run keys (``$defs/run`` but ``keep_checkpoints``), with the
    resolved parameter groups and input placement and ``protocol.select_by``."""

    epochs: int
    batch_size: int                       # global batch; a multiple of the device count
    eval_batch_size: int | None           # None: batch_size
    lr: float                             # peak learning rate of the base group
    schedule: str                         # 'cosine' (with warmup) | 'constant'
    warmup_epochs: float
    end_lr_fraction: float
    optimizer: str                        # 'momentum' | 'sgd' | 'adamw'
    momentum: float
    nesterov: bool
    weight_decay: float                   # toward zero, with regularizer 'weight_decay'
    regularizer: str                      # 'weight_decay' | 'l2_sp'
    l2_sp_alpha: float                    # L2-SP pull of pretrained kernels to their start
    l2_sp_beta: float                     # L2-SP decay of the head's kernels
    label_smoothing: float
    patience: int                         # early stop after this many epochs without gain
    select_by: str                        # 'val_top1' | 'val_loss' (finegrained.plan.selection)
    param_groups: tuple[tuple[str, float | None], ...]   # (regex, lr_mult); 0/None frozen
    augment: Augmentation
    compute_dtype: str                    # 'auto' | 'float32' | 'bfloat16'
    image_size: int                       # crop side fed to the model
    eval_crop_fraction: float
    seed: int
    num_devices: int | None               # None: all local devices
    log_every_steps: int                  # 0: log once per epoch (off a terminal)
    checkpoint_every_steps: int           # 0: at epoch ends only (with a checkpoint dir)
    prefetch_batches: int
    start: str | None                     # inputs are the output of this stage (a cache)
    cut: str | None                       # frozen part run online up to this stage
    precision: Precision                  # storage of trained parameters and optimizer state
    parallel: Parallel                    # sync data parallel, or local SGD (model averaging)

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(OptimizerSettings)})

    def step_options(self) -> StepOptions:
        return StepOptions(image_size=self.image_size, eval_crop_fraction=self.eval_crop_fraction,
                           augment=self.augment, label_smoothing=self.label_smoothing,
                           compute_dtype=self.compute_dtype, start=self.start, cut=self.cut,
                           precision=self.precision)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainSettings":
        """From a job's resolved settings (every field given, nothing else)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - fields, fields - set(d)
        if unknown or missing:
            raise ConfigError(f"TrainSettings: unknown fields {sorted(unknown)}, missing "
                              f"fields {sorted(missing)}")
        if not isinstance(d["augment"], Augmentation):
            d["augment"] = Augmentation.from_dict(d["augment"])
        if not isinstance(d["precision"], Precision):
            d["precision"] = Precision(**d["precision"])
        if not isinstance(d["parallel"], Parallel):
            d["parallel"] = Parallel(**d["parallel"])
        d["param_groups"] = tuple((str(p), None if m is None else float(m))
                                  for p, m in d["param_groups"])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_settings(**overrides: Any) -> TrainSettings:
    """The schema's defaults for every recipe and run key (no parameter groups, pixels in),
    with ``overrides``: a run outside the workflow starts from the same values a config
    starts from."""
    from finegrained.plan.schema import validate_config
    from finegrained.plan.regimes import pretrain_settings

    d = pretrain_settings(validate_config({}))["train_settings"]
    augment = overrides.pop("augment", None)
    d.update(overrides)
    if augment is not None:
        d["augment"] = augment if isinstance(augment, Augmentation) else {**d["augment"], **augment}
    return TrainSettings.from_dict(d)
