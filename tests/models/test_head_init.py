"""Head initialisation by class name ("lucky break")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrained.errors import WeightsError
from finegrained.models.head_init import (head_init_report, init_head_from_source,
                                          match_classes, normalise_name, parse_inat_label,
                                          read_inat_labels)

# The 42 of the 50 shared CUB species whose name is an iNat-birds common name; the other 8
# are absent from that label set or named differently there (genus only, a "White Pelican"
# that could be American or Great White, ...): exact matching never guesses.
CUB50_UNMATCHED = [
    "007.Parakeet_Auklet", "024.Red_faced_Cormorant", "083.White_breasted_Kingfisher",
    "101.White_Pelican", "106.Horned_Puffin", "110.Geococcyx", "124.Le_Conte_Sparrow",
    "134.Cape_Glossy_Starling",
]


@pytest.mark.parametrize("a, b", [
    ("Blue Jay", "BLUE jay"),                                   # case
    ("Black-footed Albatross", "black_footed_albatross"),       # hyphens, underscores
    ("Black  footed\tAlbatross", "Black-footed Albatross"),     # runs of whitespace
    ("Pied-billed Grebe", "Piedbilled Grebe"),                  # separators removed
    ("Anna's Hummingbird", "Anna_Hummingbird"),                 # CUB drops possessive 's
    ("Anna\u2019s Hummingbird", "Anna's Hummingbird"),          # typographic apostrophe
    ("Chuck-will's-widow", "Chuck_will_Widow"),
    ("LeConte's Sparrow", "Le_Conte_Sparrow"),
    ("001.Black_footed_Albatross", "Black-footed Albatross"),   # CUB prefix
    ("Blue-winged Teal (Male)", "Blue-winged Teal"),            # NABirds qualifier
    ("Red-tailed Hawk (Dark morph)", "red tailed hawk"),
])
def test_normalise_equal(a, b):
    assert normalise_name(a) == normalise_name(b)


@pytest.mark.parametrize("a, b", [
    ("Blue Jay", "Blue Grosbeak"),
    ("White Pelican", "American White Pelican"),   # no fuzzy matching
    ("Gray Catbird", "Grey Catbird"),              # spelling variants are not guessed
])
def test_normalise_different(a, b):
    assert normalise_name(a) != normalise_name(b)


def test_parse_inat_label():
    assert parse_inat_label("Poecile atricapillus (Black-capped Chickadee)\n") == (
        "Black-capped Chickadee", "Poecile atricapillus")
    assert parse_inat_label("background") == ("background",)


def test_match_classes_aliases_many_to_one_and_first_wins():
    source = [("Blue-winged Teal", "Spatula discors"), "Blue Jay", "blue jay", "background"]
    target = ["Blue-winged Teal (Male)", "Blue-winged Teal (Female/juvenile)",
              "Spatula discors", "Blue_Jay", "Dodo"]
    assert match_classes(target, source) == {0: 0, 1: 0, 2: 0, 3: 1}


def test_init_head_copies_matched_columns_only():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(6, 4)), rng.normal(size=(4,))
    source_kernel, source_bias = rng.normal(size=(6, 9)), rng.normal(size=(9,))
    new_kernel, new_bias = init_head_from_source(kernel, bias, source_kernel, source_bias,
                                                 {0: 8, 2: 3})
    np.testing.assert_array_equal(new_kernel[:, [0, 2]], source_kernel[:, [8, 3]])
    np.testing.assert_array_equal(new_bias[[0, 2]], source_bias[[8, 3]])
    np.testing.assert_array_equal(new_kernel[:, [1, 3]], kernel[:, [1, 3]])
    np.testing.assert_array_equal(new_bias[[1, 3]], bias[[1, 3]])
    assert not np.shares_memory(new_kernel, kernel)  # inputs untouched
    with pytest.raises(WeightsError, match="input width"):
        init_head_from_source(kernel, bias, source_kernel[:5], source_bias, {0: 0})
    with pytest.raises(WeightsError, match="out of range"):
        init_head_from_source(kernel, bias, source_kernel, source_bias, {0: 9})


def _cub50_names(cub50) -> list[str]:
    lines = (cub50 / "classes.txt").read_text().splitlines()
    return [line.split(maxsplit=1)[1] for line in lines if line.strip()]


def test_cub50_against_inat_labels(cub50, shared_weights, tmp_path):
    target = _cub50_names(cub50)
    source = read_inat_labels(shared_weights / "inat_bird_labels.txt")
    assert len(target) == 50 and len(source) == 965 and source[964] == ("background",)

    mapping = match_classes(target, source)
    report = head_init_report(target, source, mapping)
    assert report["num_matched"] == len(mapping) == 42
    assert report["unmatched_targets"] == CUB50_UNMATCHED
    pairs = {p["target_name"]: p["source_name"] for p in report["matched"]}
    assert pairs["061.Heermann_Gull"] == "Heermann's Gull"
    assert pairs["159.Black_and_white_Warbler"] == "Black-and-white Warbler"
    assert pairs["187.American_Three_toed_Woodpecker"] == "American Three-toed Woodpecker"
    assert 964 not in mapping.values()
    json.loads(json.dumps(report))

    rng = np.random.default_rng(1)
    source_kernel = rng.normal(size=(1280, 965)).astype(np.float32)
    source_bias = rng.normal(size=(965,)).astype(np.float32)
    kernel = rng.normal(size=(1280, 50)).astype(np.float32)
    bias = np.zeros((50,), np.float32)
    new_kernel, new_bias = init_head_from_source(kernel, bias, source_kernel, source_bias,
                                                 mapping)
    for t in range(50):
        if t in mapping:
            np.testing.assert_array_equal(new_kernel[:, t], source_kernel[:, mapping[t]])
            assert new_bias[t] == source_bias[mapping[t]]
        else:
            np.testing.assert_array_equal(new_kernel[:, t], kernel[:, t])
            assert new_bias[t] == 0


# --- zero-shot: the iNat-birds MobileNetV2 with a name-matched head, no training ----------

ZERO_SHOT_PER_SPECIES = 2  # test photos per matched species: 84 images keeps this < 60 s


def _cub_test_images(cub50, class_ids: list[int]) -> list[tuple[str, int]]:
    """(relative image path, 0-based class index) of every CUB test image."""
    def table(name):
        return dict(line.split() for line in (cub50 / name).read_text().splitlines()
                    if line.strip())
    images, labels = table("images.txt"), table("image_class_labels.txt")
    is_train = table("train_test_split.txt")
    index = {cid: i for i, cid in enumerate(class_ids)}
    return [(images[i], index[int(labels[i])]) for i in images if is_train[i] == "0"]


@pytest.mark.slow
def test_zero_shot_inat_head_on_cub50(cub50, shared_weights):
    """With only the matched columns of the iNat classifier as the head, MobileNetV2
    names the species of CUB test photos far above chance: the evidence that the name
    matching is right and that a lucky-break head is worth having."""
    Image = pytest.importorskip("PIL.Image")
    jax = pytest.importorskip("jax")
    from flax import nnx

    from finegrained.models import assign_state, build_model, to_flat
    from finegrained.models.weights import read_tensors

    lines = [l for l in (cub50 / "classes.txt").read_text().splitlines() if l.strip()]
    class_ids = [int(l.split()[0]) for l in lines]
    target = [l.split(maxsplit=1)[1] for l in lines]
    mapping = match_classes(target, read_inat_labels(shared_weights / "inat_bird_labels.txt"))

    flat = to_flat(read_tensors(shared_weights / "mobilenet_v2_1.0_224_inat_birds.npz"),
                   "mobilenet_v2")
    # Unmatched classes can never win: zero weights, -inf bias.
    flat["head/kernel"], flat["head/bias"] = init_head_from_source(
        np.zeros((1280, len(target)), np.float32), np.full(len(target), -np.inf, np.float32),
        flat["head/kernel"], flat["head/bias"], mapping)
    # Every tensor is assigned below, so skip the (slow, eager) random initialisation.
    model = nnx.eval_shape(lambda: build_model("mobilenet_v2", len(target),
                                               rngs=nnx.Rngs(0)))
    assign_state(model, flat)

    # A fixed, seeded subset: ZERO_SHOT_PER_SPECIES test photos of each matched species.
    rng = np.random.default_rng(0)
    by_class: dict[int, list[str]] = {}
    for path, label in _cub_test_images(cub50, class_ids):
        if label in mapping:
            by_class.setdefault(label, []).append(path)
    chosen = [(path, label) for label in sorted(by_class)
              for path in rng.choice(sorted(by_class[label]), ZERO_SHOT_PER_SPECIES,
                                     replace=False)]
    pixels = np.stack([
        np.asarray(Image.open(cub50 / "images" / path).convert("RGB")
                   .resize((224, 224), Image.Resampling.BILINEAR), np.uint8)
        for path, _ in chosen])
    labels = np.array([label for _, label in chosen])

    graph, state = nnx.split(model)

    @jax.jit
    def predict(state, x):
        return jax.numpy.argmax(nnx.merge(graph, state)(x), axis=-1)

    batch = len(mapping)  # equal batches: one compilation
    predictions = np.concatenate([np.asarray(predict(state, pixels[i:i + batch]))
                                  for i in range(0, len(pixels), batch)])
    accuracy = float(np.mean(predictions == labels))
    chance = 1 / len(mapping)
    print(f"zero-shot top-1 on {len(labels)} CUB test photos of {len(mapping)} matched "
          f"species: {accuracy:.3f} (chance {chance:.3f})")
    assert set(predictions) <= set(mapping)
    assert accuracy > 0.6 > 20 * chance
