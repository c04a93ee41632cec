"""The bicubic resize matrices reproduce ``torch.nn.functional.interpolate`` (bicubic,
``align_corners=False``, target size, with and without antialiasing) on 2-D grids."""

from __future__ import annotations

import numpy as np
import pytest

from finegrained.models.bicubic import resize_matrix


@pytest.mark.parametrize("antialias", [False, True])
def test_rows_sum_to_one_and_same_size_is_identity(antialias):
    for size in range(1, 12):
        np.testing.assert_array_equal(resize_matrix(size, size, antialias=antialias),
                                      np.eye(size, dtype=np.float32))
        for out in range(1, 12):
            np.testing.assert_allclose(resize_matrix(size, out, antialias=antialias).sum(1),
                                       1.0, atol=1e-6)


@pytest.mark.parametrize("antialias", [False, True])
def test_matches_torch_interpolate(antialias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    worst = 0.0
    for stored in (2, 3, 4, 5, 7, 16, 37):
        for out_h, out_w in [(2, 2), (3, 5), (6, 6), (9, 4), (16, 16), (24, 31), (37, 37)]:
            grid = rng.normal(size=(3, stored, stored)).astype(np.float32)
            theirs = torch.nn.functional.interpolate(
                torch.from_numpy(grid)[None], size=(out_h, out_w), mode="bicubic",
                align_corners=False, antialias=antialias)[0].numpy()
            rows, cols = (resize_matrix(stored, n, antialias=antialias) for n in (out_h, out_w))
            ours = np.einsum("yi,xj,cij->cyx", rows, cols, grid)
            worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < 2e-5, worst
