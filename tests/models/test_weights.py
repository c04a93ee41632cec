"""Weight files (safetensors / npz, pickles refused) and merge_params."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrained.errors import WeightsError
from finegrained.models.weights import (load_pretrained, merge_params, read_metadata,
                                        read_tensors, save_weights, weights_metadata)


def _flat(num_classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "stem/conv/kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32),
        "stem/bn/scale": rng.normal(size=(8,)).astype(np.float32),
        "stem/bn/mean": rng.normal(size=(8,)).astype(np.float32),
        "stem/bn/var": rng.random(size=(8,)).astype(np.float32),
        "head/kernel": rng.normal(size=(8, num_classes)).astype(np.float32),
        "head/bias": rng.normal(size=(num_classes,)).astype(np.float32),
    }


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --- files ------------------------------------------------------------------------------

def test_safetensors_round_trip_with_metadata(tmp_path):
    flat = _flat()
    flat["step"] = np.array(7, dtype=np.int32)  # scalars and ints survive too
    meta = weights_metadata(arch="resnet18", num_classes=3, class_names=["a", "b c", "d’e"],
                            input_recipe="(x - 128) / 128", source="unit test")
    path = save_weights(tmp_path / "w.safetensors", flat, metadata=meta)
    _assert_same(read_tensors(path), flat)
    got = read_metadata(path)
    assert got == meta
    assert json.loads(got["class_names"]) == ["a", "b c", "d’e"]
    assert int(got["num_classes"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_without_metadata(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", _flat())
    assert read_metadata(path) == {}


def test_save_refuses_non_string_metadata(tmp_path):
    with pytest.raises(WeightsError, match="strings"):
        save_weights(tmp_path / "w.safetensors", _flat(), metadata={"num_classes": 3})
    assert list(tmp_path.iterdir()) == []


def test_npz_round_trip(tmp_path):
    flat = _flat()
    np.savez(tmp_path / "w.npz", **flat)
    _assert_same(read_tensors(tmp_path / "w.npz"), flat)
    assert read_metadata(tmp_path / "w.npz") == {}


def test_npz_with_object_array_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", ok=np.zeros(3), evil=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(WeightsError, match="evil.*(pickle|objects)"):
        read_tensors(tmp_path / "evil.npz")


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.pkl"])
def test_pickled_formats_refused_with_conversion_hint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightsError) as info:
        read_tensors(path)
    message = str(info.value)
    assert "pickle" in message and "refused" in message
    assert "safetensors" in message and "save_file" in message and "torch.load" in message


def test_unknown_and_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsError, match="unknown weights format"):
        read_tensors(tmp_path / "w.h5")
    with pytest.raises(WeightsError, match="not found"):
        read_tensors(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="safetensors"):
        read_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="npz"):
        read_tensors(tmp_path / "bad.npz")


def test_real_shared_npz_reads(shared_weights):
    tensors = read_tensors(shared_weights / "mobilenet_v2_1.0_224_inat_birds.npz")
    assert tensors["Logits/kernel"].shape == (1280, 965)
    assert all(t.dtype == np.float32 for t in tensors.values())


# --- merge_params -----------------------------------------------------------------------

def test_merge_replaces_head_and_loads_body():
    init, loaded = _flat(num_classes=5, seed=1), _flat(num_classes=3, seed=2)
    merged, report = merge_params(init, loaded)
    for name in ("stem/conv/kernel", "stem/bn/scale", "stem/bn/mean", "stem/bn/var"):
        np.testing.assert_array_equal(merged[name], loaded[name])
    for name in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(merged[name], init[name])
    assert report["loaded"] == 4 and report["total"] == 6
    assert report["replaced_head"] is True
    assert sorted(report["kept_from_init"]) == ["head/bias", "head/kernel"]
    json.dumps(report)


def test_merge_head_absent_from_pretrained_is_fine():
    init, loaded = _flat(seed=1), _flat(seed=2)
    del loaded["head/kernel"], loaded["head/bias"]
    merged, report = merge_params(init, loaded)
    np.testing.assert_array_equal(merged["head/kernel"], init["head/kernel"])
    np.testing.assert_array_equal(merged["stem/conv/kernel"], loaded["stem/conv/kernel"])
    assert report["loaded"] == 4 and report["total"] == 6 and report["replaced_head"] is True
    assert sorted(report["kept_from_init"]) == ["head/bias", "head/kernel"]


def test_merge_keep_head_requires_same_shape():
    init, loaded = _flat(num_classes=3, seed=1), _flat(num_classes=3, seed=2)
    merged, report = merge_params(init, loaded, replace_head=False)
    np.testing.assert_array_equal(merged["head/kernel"], loaded["head/kernel"])
    assert report["replaced_head"] is False and report["loaded"] == 6
    with pytest.raises(WeightsError, match=r"head/kernel.*\(8, 5\).*\(8, 3\)"):
        merge_params(_flat(num_classes=5), loaded, replace_head=False)


def test_merge_dont_load_keeps_init():
    init, loaded = _flat(seed=1), _flat(seed=2)
    loaded["stem/bn/mean"] = np.zeros((99,), np.float32)  # wrong shape, but not loaded
    merged, report = merge_params(init, loaded, dont_load=[r"stem/bn/(mean|var)"])
    for name in ("stem/bn/mean", "stem/bn/var"):
        np.testing.assert_array_equal(merged[name], init[name])
    np.testing.assert_array_equal(merged["stem/bn/scale"], loaded["stem/bn/scale"])
    assert set(report["kept_from_init"]) == {"stem/bn/mean", "stem/bn/var", "head/kernel",
                                             "head/bias"}
    # fullmatch: a pattern naming a prefix does not silently catch more
    merged, _ = merge_params(init, _flat(seed=2), dont_load=[r"stem/bn"])
    np.testing.assert_array_equal(merged["stem/bn/mean"], _flat(seed=2)["stem/bn/mean"])


def test_merge_casts_to_init_dtype():
    init, loaded = _flat(seed=1), _flat(seed=2)
    loaded["stem/conv/kernel"] = loaded["stem/conv/kernel"].astype(np.float64)
    merged, report = merge_params(init, loaded)
    assert merged["stem/conv/kernel"].dtype == np.float32
    assert report["cast_dtype"] == ["stem/conv/kernel"]


def test_merge_reports_every_mismatch_at_once():
    init, loaded = _flat(seed=1), _flat(seed=2)
    del loaded["stem/bn/var"]                                   # missing
    loaded["stem/extra/kernel"] = np.zeros((2, 7), np.float32)  # unexpected
    loaded["stem/conv/kernel"] = np.zeros((5, 5, 3, 8), np.float32)  # wrong shape
    with pytest.raises(WeightsError) as info:
        merge_params(init, loaded)
    message = str(info.value)
    assert "3 pretrained tensor(s)" in message
    assert "stem/bn/var" in message and "(8,)" in message
    assert "stem/extra/kernel" in message and "(2, 7)" in message
    assert "stem/conv/kernel" in message
    assert "(3, 3, 3, 8)" in message and "(5, 5, 3, 8)" in message
    lines = message.splitlines()
    assert any("missing" in l and "stem/bn/var" in l for l in lines)
    assert any("unexpected" in l and "stem/extra/kernel" in l for l in lines)
    assert any("wrong shape" in l and "stem/conv/kernel" in l and "(3, 3, 3, 8)" in l
               and "(5, 5, 3, 8)" in l for l in lines)


def test_merge_bad_regex():
    with pytest.raises(WeightsError, match="dont_load"):
        merge_params(_flat(), _flat(), dont_load=["("])


# --- with the real models ---------------------------------------------------------------

def test_load_pretrained_into_real_model(tmp_path):
    from flax import nnx

    from finegrained.models import build_model
    from finegrained.models.params import flatten_state

    source = build_model("resnet18", 10, width=8, rngs=nnx.Rngs(0))
    source_flat = flatten_state(source)
    path = save_weights(tmp_path / "r18.safetensors", source_flat,
                        metadata=weights_metadata(arch="resnet18", num_classes=10))
    target = build_model("resnet18", 5, width=8, rngs=nnx.Rngs(1))
    init_flat = {k: np.array(v) for k, v in flatten_state(target).items()}

    report = load_pretrained(target, path, arch="resnet18")

    after = flatten_state(target)
    assert sorted(after) == sorted(init_flat)
    body = [n for n in after if not n.startswith("head/")]
    assert body and report["loaded"] == len(body)
    for name in body:
        np.testing.assert_array_equal(np.asarray(after[name]), source_flat[name], err_msg=name)
    for name in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(np.asarray(after[name]), init_flat[name], err_msg=name)
    assert after["head/kernel"].shape[1] == 5 and report["replaced_head"] is True


def _timm_resnet50_state_dict() -> dict[str, np.ndarray]:
    """Names and shapes of timm's ResNet-50 checkpoints (e.g. the default config's
    timm/resnet50.a1_in1k model.safetensors): torchvision's layout, Bottleneck v1.5."""
    state = {}

    def conv(name, cout, cin, k):
        state[f"{name}.weight"] = np.zeros((cout, cin, k, k), np.float32)

    def bn(name, c):
        for field in ("weight", "bias", "running_mean", "running_var"):
            state[f"{name}.{field}"] = np.ones((c,), np.float32)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", width, cin, 1)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            conv(f"{prefix}.conv3", 4 * width, width, 1)
            bn(f"{prefix}.bn3", 4 * width)
            if block == 0:
                conv(f"{prefix}.downsample.0", 4 * width, cin, 1)
                bn(f"{prefix}.downsample.1", 4 * width)
            cin = 4 * width
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    return state


def test_timm_resnet50_names_load_into_resnet50(tmp_path):
    from flax import nnx

    from finegrained.models import build_model

    from safetensors.numpy import save_file
    state = _timm_resnet50_state_dict()
    assert len(state) == 267                  # 53 convs, 53 batch norms (4 each), fc (2)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = build_model("resnet50", 555, rngs=nnx.Rngs(0))
    report = load_pretrained(model, path, arch="resnet50")
    assert report["loaded"] == 265 and report["replaced_head"] is True


def test_saved_weights_are_byte_identical_across_processes(tmp_path):
    """safetensors keeps metadata in a hash map (random order per process); our writer
    sorts the header, so equal weights give equal files (hashes, resumed runs)."""
    import subprocess
    import sys
    script = (
        "import sys, numpy as np\n"
        "from finegrained.models.weights import save_weights\n"
        "save_weights(sys.argv[1], {'b/x': np.arange(5, dtype=np.float32),"
        " 'a': np.ones((2, 3), np.float32)},"
        " metadata={k: str(i) for i, k in enumerate('zyxwvutsrq')})\n")
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    tensors = read_tensors(paths[0])
    assert np.array_equal(tensors["b/x"], np.arange(5, dtype=np.float32))
    assert read_metadata(paths[0])["q"] == "9"
