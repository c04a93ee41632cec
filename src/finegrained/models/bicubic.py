"""PyTorch's bicubic resizing as matrices: ``resized = W @ signal`` along one axis.

Why matrices: a ViT's position embeddings are stored on the checkpoint's patch grid and
resampled to the image's grid on the fly (see ``vit``). Both grids are static shapes, so
the resampling is two small constant matrices applied to the parameter (``Wy @ grid @
Wx^T``): gradients flow to the stored embedding and the model does not depend on the
input size. The reference implementations resize with ``torch.nn.functional.interpolate``
(``mode='bicubic'``, ``align_corners=False``, a target ``size=``), and those numbers must
be reproduced exactly; ``jax.image.resize`` does not (its cubic kernel has a = -0.5 and no
edge clamping).

Two kernels, as in torch's CPU code (``aten/src/ATen/native/UpSample.h`` and
``cpu/UpSampleKernel.cpp``), both with the source coordinate of output ``i`` at
``(i + 0.5) * in / out - 0.5``:

* ``antialias=False`` (``Dinov2Model``, ``ViTModel``): Keys' cubic with a = -0.75 on the
  four nearest inputs, indices clamped to the edge (edge values repeated).
* ``antialias=True`` (``Dinov2WithRegistersModel``): the PIL-style filter, cubic with
  a = -0.5, stretched by ``in / out`` when shrinking (so it averages, not aliases), cut at
  the edges and renormalised to sum 1.

Only numpy is needed here.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``x``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _plain_matrix(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    source = (np.arange(out_size) + 0.5) * scale - 0.5
    first = np.floor(source)
    matrix = np.zeros((out_size, in_size))
    for tap in range(-1, 3):   # the four nearest inputs, edge-clamped
        weight = _cubic(source - (first + tap), -0.75)
        index = np.clip(first + tap, 0, in_size - 1).astype(int)
        np.add.at(matrix, (np.arange(out_size), index), weight)
    return matrix


def _antialiased_matrix(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / max(scale, 1.0)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        # torch truncates these bounds towards zero (int64 casts)
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), in_size)
        taps = np.arange(low, high)
        weight = _cubic((taps - center + 0.5) * inv_scale, -0.5)
        total = weight.sum()
        matrix[i, low:high] = weight / total if total != 0 else weight
    return matrix


def resize_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """The ``(out_size, in_size)`` float32 matrix of torch's 1-D bicubic resize
    (``align_corners=False``, target size given); ``antialias`` as torch's flag."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    build = _antialiased_matrix if antialias else _plain_matrix
    return build(in_size, out_size).astype(np.float32)
