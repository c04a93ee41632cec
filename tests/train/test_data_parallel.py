"""Data parallelism on a 4-device CPU mesh equals the same step on one device.

Runs in a subprocess: the device count is fixed when jax first initialises, and other tests
in this pytest process have already imported it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from helpers.xla import xla_flags

SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "@XLA_FLAGS@"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from flax import nnx
    from helpers.training import TinyNet, coloured_squares, crop_and_flip, step_options, train_state
    from finegrained.train.sharding import make_mesh, replicate, shard_batch
    from finegrained.train.steps import make_eval_metrics_step, make_train_step
    from finegrained.train.validation import validate

    assert jax.device_count() == 4, jax.devices()
    options = step_options(image_size=20, augment=crop_and_flip(brightness=0.2, scale_jitter=0.2),
                           label_smoothing=0.1)
    images, labels = coloured_squares(16, seed=0)
    batch = {"image": images, "label": labels}
    rng = jax.random.key(11)

    results = {}
    for n in (1, 4):
        mesh = make_mesh(n)
        state = train_state(TinyNet(4, rngs=nnx.Rngs(0)), lr=0.1,
                                   weight_decay=1e-4, param_groups=[("stem/.*", 0.5)])
        state = replicate(state, mesh)
        sharded = shard_batch(batch, mesh)
        assert len(sharded["image"].sharding.device_set) == n
        new_state, metrics = make_train_step(options, mesh=mesh)(state, sharded, rng)
        leaf = jax.tree_util.tree_leaves(new_state.params)[0]
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == n
        results[n] = (jax.device_get((new_state.params, new_state.stats)),
                      float(metrics["loss"]))
        ev = validate(new_state, coloured_squares(13, seed=2),
                      make_eval_metrics_step(options, mesh=mesh),
                      batch_size=8, mesh=mesh)
        assert ev["count"] == 13, ev
        results[n] += (ev["top1"],)

    (p1, l1, e1), (p4, l4, e4) = results[1], results[4]
    assert abs(l1 - l4) < 1e-5, (l1, l4)
    assert e1 == e4, (e1, e4)
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)))
    assert worst < 1e-5, worst
    try:
        shard_batch({"image": images[:6], "label": labels[:6]}, make_mesh(4))
    except ValueError as err:
        assert "not divisible" in str(err)
    else:
        raise AssertionError("a batch of 6 on 4 devices must be refused")
    print("OK max param difference", worst)
''').replace("@XLA_FLAGS@", xla_flags(4))


def test_sharded_step_matches_single_device(tmp_path):
    tests_dir = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tests_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
