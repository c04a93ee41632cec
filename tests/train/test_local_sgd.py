"""Local SGD (periodic model averaging, ``train.parallel``) on a 4-device CPU mesh: H = 1
equals synchronous data parallelism; with H > 1 the copies drift apart between averages and
are identical right after one; a run killed (SIGKILL) mid-period resumes bit-identically;
pretraining takes its own ``parallel`` and ``precision``.

Runs in subprocesses: the device count is fixed when jax first initialises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finegrained.errors import ConfigError
from finegrained.train.local_sgd import SYNC, Parallel
from helpers.xla import xla_flags

PRELUDE = textwrap.dedent('''
    import os, sys, json, signal
    os.environ["XLA_FLAGS"] = "@XLA_FLAGS@"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import dataclasses
    import jax, numpy as np
    from flax import nnx
    from helpers.training import TinyNet, coloured_squares, crop_and_flip
    from finegrained.models.params import flatten_state
    from finegrained.train.local_sgd import Parallel
    from finegrained.train.loop import TIMING_FIELDS, fit
    from finegrained.train.settings import default_settings

    assert jax.device_count() == 4, jax.devices()
    BASE = default_settings(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, weight_decay=1e-4,
                            image_size=20, eval_crop_fraction=1.0, compute_dtype="float32",
                            augment=crop_and_flip(brightness=0.2), seed=3, num_devices=4,
                            log_every_steps=1, checkpoint_every_steps=0)
    TRAIN, VAL = coloured_squares(64, seed=4), coloured_squares(24, seed=5)

    def comparable(history):
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]
''').replace("@XLA_FLAGS@", xla_flags(4))


def _run(script: str, *args: str) -> str:
    tests_dir = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script),
                           str(tests_dir), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    return proc


def test_h1_equals_sync_and_copies_drift_between_averages():
    proc = _run('''
        def train(parallel, batch_norm=False):
            model = TinyNet(4, rngs=nnx.Rngs(0), batch_norm=batch_norm)
            result = fit(model, TRAIN, VAL, dataclasses.replace(BASE, parallel=parallel),
                         log_fn=None)
            return result, flatten_state(model)

        sync, w_sync = train(Parallel("sync", 1, True))
        local, w_local = train(Parallel("local_sgd", 1, True))
        kept, w_kept = train(Parallel("local_sgd", 1, False))   # momentum is linear: same
        for a, b in ((sync, local), (sync, kept)):
            for ra, rb in zip(a.history, b.history):
                assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-6, (ra, rb)
                assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-6, (ra, rb)
        worst = max(float(np.max(np.abs(w_sync[k] - w[k]))) for w in (w_local, w_kept)
                    for k in w_sync)
        assert worst < 1e-6, worst
        assert sync.history[-1]["communication_rounds"] == 8          # 4 steps x 2 epochs
        assert local.history[-1]["param_bytes"] == sync.history[-1]["param_bytes"]

        # H = 4: the copies on the 4 devices differ after steps 1-3 and agree after step 4
        from finegrained.train.loop import prepare
        from finegrained.train.sharding import shard_batch
        settings = dataclasses.replace(BASE, parallel=Parallel("local_sgd", 4, True))
        run = prepare(TinyNet(4, rngs=nnx.Rngs(0)), 64, settings)
        images, labels = TRAIN
        spread = []
        for step in range(8):
            rows = slice(16 * (step % 4), 16 * (step % 4 + 1))
            batch = shard_batch({"image": images[rows], "label": labels[rows]}, run.mesh)
            run.state, _ = run.train_step(run.state, batch, jax.random.key(step))
            kernel = np.asarray(jax.device_get(run.state.params["head"]["kernel"].value))
            assert kernel.shape[0] == 4
            spread.append(float(np.max(np.abs(kernel - kernel[:1]))))
        assert all(s > 0 for i, s in enumerate(spread) if (i + 1) % 4), spread
        assert spread[3] == 0.0 and spread[7] == 0.0, spread
        h16 = fit(TinyNet(4, rngs=nnx.Rngs(0)), TRAIN, VAL,
                  dataclasses.replace(BASE, parallel=Parallel("local_sgd", 2, False)), log_fn=None)
        assert h16.history[-1]["communication_rounds"] == 4
        assert np.isfinite(h16.history[-1]["val_loss"])
        print("OK", worst, spread)
    ''')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_sigkill_mid_period_resumes_bit_identically(tmp_path):
    """H = 3, 4 steps an epoch: the process is killed at step 5, after the epoch-end
    checkpoint of step 4 (mid-period: averaged at step 3, the copies differ again after step
    4); the rerun resumes from it and ends as the uninterrupted run does, copies, averages
    and history alike."""
    script = '''
        mode, out = sys.argv[2], sys.argv[3]
        settings = dataclasses.replace(BASE, checkpoint_every_steps=3,
                                       parallel=Parallel("local_sgd", 3, False),
                                       augment=crop_and_flip(flip=0.5, brightness=0.2,
                                                             crop_area=(0.5, 1)))

        def killer(line):
            if mode == "kill" and " step 5/" in line:
                os.kill(os.getpid(), signal.SIGKILL)

        lines = []
        model = TinyNet(4, rngs=nnx.Rngs(0))
        result = fit(model, TRAIN, VAL, settings, checkpoint_dir=out + "/ckpt",
                     log_fn=lambda line: (lines.append(line), killer(line)))
        np.savez(out + "/weights.npz", **flatten_state(model))
        with open(out + "/history.json", "w") as f:
            json.dump({"history": comparable(result.history), "log": lines}, f)
    '''
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert _run(script, "run", str(straight)).returncode == 0
    proc = _run(script, "kill", str(killed))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "history.json").exists()
    import jax
    import numpy as np
    from finegrained.train.checkpoint import Checkpointer
    ckpt = Checkpointer(killed / "ckpt")
    assert ckpt.latest_step() == 4
    # the stacked copies (4 on the leading axis) of the conv and head kernels
    copies = [np.asarray(x) for x in jax.tree_util.tree_leaves(ckpt.restore_saved(4))
              if np.issubdtype(np.asarray(x).dtype, np.floating) and np.ndim(x) >= 3
              and np.shape(x)[0] == 4]
    assert len(copies) >= 3
    assert any(np.abs(x - x[:1]).max() > 0 for x in copies), "the checkpoint is mid-period"
    ckpt.close()
    proc = _run(script, "run", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "history.json").read_text())
    b = json.loads((killed / "history.json").read_text())
    assert "resumed from checkpoint at step 4" in b["log"][0]
    assert a["history"][-1]["communication_rounds"] == 2          # 8 steps / H = 3
    assert a["history"] == b["history"]
    wa, wb = np.load(straight / "weights.npz"), np.load(killed / "weights.npz")
    for key in wa.files:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


def test_parallel_values_are_checked():
    assert SYNC.communication_rounds(10) == 10
    assert Parallel("local_sgd", 4, True).communication_rounds(10) == 2
    with pytest.raises(ConfigError, match="mode"):
        Parallel("async", 1, True)
    with pytest.raises(ConfigError, match="average_every"):
        Parallel("local_sgd", 0, True)


@pytest.mark.slow
def test_pretraining_takes_its_parallel_and_precision_from_the_config(tmp_path):
    """`pretrain.parallel` and `pretrain.precision` reach the pretrain job as the regimes'
    keys reach theirs: local SGD at H = 2 on 4 devices with bfloat16 weights rounded
    stochastically. 48 images in batches of 16 for 2 epochs are 6 steps, 3 averages; the
    weights are stored in 2 bytes each and exported as float32."""
    import jax
    import numpy as np
    from flax import nnx
    from helpers.training import pretrain_inputs, pretrain_settings_json
    from finegrained.models import build_model
    from finegrained.models.weights import read_tensors
    settings = pretrain_settings_json(
        epochs=2, num_devices=4, parallel={"mode": "local_sgd", "average_every": 2},
        precision={"params": "bfloat16", "rounding": "stochastic"})
    out_w, out_m = tmp_path / "pre" / "weights.safetensors", tmp_path / "pre" / "metrics.json"
    argv = ["--settings", settings, *pretrain_inputs(tmp_path, ["A", "B", "C", "D"]),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--out-weights", str(out_w),
            "--out-metrics", str(out_m)]
    proc = _run('''
        from helpers.scripts import load_script
        sys.exit(load_script("pretrain").main(json.loads(sys.argv[2])))
    ''', json.dumps(argv))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = json.loads(out_m.read_text())["history"]
    assert [row["communication_rounds"] for row in history] == [1, 3]   # after steps 3 and 6
    model = build_model("resnet18", 4, width=4, stage_depths=[1, 1, 1, 1], rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert history[-1]["param_bytes"] == 2 * params
    tensors = read_tensors(out_w)
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
