"""The pretrained MobileNetV2 weights in ../shared reproduce the reference logits on the
shared bird photo, loaded through the same converter and assignment the pipeline uses."""

from __future__ import annotations

import json

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")
from flax import nnx  # noqa: E402

from finegrained.models import assign_state, build_model, detect_layout, to_flat  # noqa: E402

NETWORKS = [("mobilenet_v2_1.0_224_imagenet", 1001), ("mobilenet_v2_1.0_224_inat_birds", 965)]
ATOL = 1e-4  # expected_outputs.json's tolerance hint for float32 logits


@pytest.fixture(scope="module")
def expected(shared_weights):
    return json.loads((shared_weights / "expected_outputs.json").read_text())


@pytest.fixture(scope="module")
def bird(shared_weights, expected):
    # expected_outputs.json's resize recipe, verbatim: aspect ratio not preserved
    image = PIL.open(shared_weights / "bird.bmp").convert("RGB")
    pixels = np.asarray(image.resize((224, 224), PIL.Resampling.BILINEAR), np.uint8)
    assert int(pixels.sum()) == expected["preprocessing"]["uint8_input_sum"]
    return pixels[None]


@pytest.mark.parametrize("name,num_classes", NETWORKS)
def test_shared_weights_reproduce_reference_logits(shared_weights, expected, bird, name,
                                                   num_classes):
    reference = expected[name]
    with np.load(shared_weights / f"{name}.npz") as npz:
        tensors = {key: npz[key] for key in npz.files}
    assert detect_layout(tensors) == "tf_mobilenet_v2"
    model = nnx.eval_shape(lambda: build_model("mobilenet_v2", num_classes, rngs=nnx.Rngs(0)))
    assign_state(model, to_flat(tensors, "mobilenet_v2"))

    logits = np.asarray(model(bird))[0]
    want = np.asarray(reference["float_logits_full"], np.float32)
    assert logits.shape == (num_classes,)
    top5 = [int(i) for i in np.argsort(-logits)[:5]]
    assert top5 == [entry["index"] for entry in reference["float_forward_top5"]]
    print(f"{name}: max abs logit difference to the reference "
          f"{float(np.max(np.abs(logits - want))):.2e}")
    np.testing.assert_allclose(logits, want, rtol=0, atol=ATOL)
    # float pixels on the 0..255 scale (what augmentation produces) give the same answer
    np.testing.assert_allclose(np.asarray(model(bird.astype(np.float32)))[0], logits,
                               rtol=0, atol=1e-6)
