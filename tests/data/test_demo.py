"""The synthetic demo dataset: exact NABirds conventions, determinism, true boxes, and species
that differ only in their designed details."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrained import demo

SMALL = dict(num_classes=6, train_per_class=3, test_per_class=2, min_side=96, max_side=140)
ANNOTATION_FILES = ["images.txt", "image_class_labels.txt", "train_test_split.txt",
                    "bounding_boxes.txt", "sizes.txt", "classes.txt", "hierarchy.txt",
                    "photographers.txt", "species.json", "README.txt"]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "target"
    demo.generate_demo_dataset(root, variant="target", seed=3, **SMALL)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "source"
    demo.generate_demo_dataset(root, variant="source", seed=3, **SMALL)
    return root


def _table(path: Path) -> dict[str, list[str]]:
    rows = [line.split(" ", 1) for line in path.read_text().splitlines()]
    keys = [key for key, _ in rows]
    assert len(set(keys)) == len(keys), f"duplicate keys in {path.name}"
    return {key: rest.split() for key, rest in rows}


def _classes(root: Path) -> dict[int, str]:
    return {int(k): v for k, v in (line.split(" ", 1) for line in
                                   (root / "classes.txt").read_text().splitlines())}


def test_files_follow_nabirds_conventions(target):
    images = _table(target / "images.txt")
    labels = {k: int(v[0]) for k, v in _table(target / "image_class_labels.txt").items()}
    split = {k: int(v[0]) for k, v in _table(target / "train_test_split.txt").items()}
    boxes = {k: list(map(int, v)) for k, v in _table(target / "bounding_boxes.txt").items()}
    sizes = {k: list(map(int, v)) for k, v in _table(target / "sizes.txt").items()}
    photographers = _table(target / "photographers.txt")
    n = SMALL["num_classes"] * (SMALL["train_per_class"] + SMALL["test_per_class"])
    assert len(images) == n
    for table in (labels, split, boxes, sizes, photographers):
        assert list(table) == list(images)         # same ids, same (UUID-sorted) order
    assert list(images) == sorted(images)

    classes = _classes(target)
    for image_id, (rel,) in images.items():
        assert str(uuid.UUID(image_id)) == image_id and image_id.count("-") == 4
        assert rel == f"{labels[image_id]:04d}/{image_id.replace('-', '')}.jpg"
        assert labels[image_id] in classes
        w, h = sizes[image_id]
        with Image.open(target / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
        assert SMALL["min_side"] <= min(w, h) and max(w, h) <= SMALL["max_side"]
        x, y, bw, bh = boxes[image_id]
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        assert photographers[image_id]

    leaves = sorted(set(labels.values()))
    assert len(leaves) == SMALL["num_classes"]
    for leaf in leaves:
        in_split = [split[i] for i in labels if labels[i] == leaf]
        assert in_split.count(1) == SMALL["train_per_class"]
        assert in_split.count(0) == SMALL["test_per_class"]
    assert set(split.values()) == {0, 1}


def test_taxonomy_leads_every_leaf_to_the_root(target):
    classes = _classes(target)
    parents = {int(c): int(p) for c, p in (line.split() for line in
                                           (target / "hierarchy.txt").read_text().splitlines())}
    assert classes[0] == "Birds" and 0 not in parents
    assert set(parents) == set(classes) - {0} and set(parents.values()) <= set(classes)
    leaves = {int(v[0]) for v in _table(target / "image_class_labels.txt").values()}
    assert not leaves & set(parents.values())       # labels are leaves, never parents
    for leaf in leaves:
        chain = [leaf]
        while chain[-1] != 0:
            chain.append(parents[chain[-1]])
            assert len(chain) < 10
        assert len(chain) == 5                    # species, genus, family, order, Birds
    ids = sorted(classes)
    assert ids != list(range(len(ids)))           # non-contiguous, like NABirds
    assert len(set(classes.values())) == len(classes)


def test_same_arguments_give_identical_bytes(target, tmp_path):
    again = tmp_path / "again"
    demo.generate_demo_dataset(again, variant="target", seed=3, **SMALL)
    for name in ANNOTATION_FILES:
        assert (again / name).read_bytes() == (target / name).read_bytes(), name
    for rel in sorted(p.relative_to(target) for p in target.rglob("*.jpg")):
        assert (again / rel).read_bytes() == (target / rel).read_bytes(), rel

    other = tmp_path / "other"
    demo.generate_demo_dataset(other, variant="target", seed=4, **SMALL)
    assert (other / "images.txt").read_bytes() != (target / "images.txt").read_bytes()


def test_target_and_source_do_not_share_classes_or_images(target, source):
    t, s = _classes(target), _classes(source)
    assert set(t) & set(s) == {0}                       # only the root "Birds"
    assert set(t.values()) & set(s.values()) == {"Birds"}
    assert not set(_table(target / "images.txt")) & set(_table(source / "images.txt"))
    assert all(c >= 1000 for c in s if c)


def test_box_holds_the_bird_in_the_written_photos(target):
    boxes = {k: list(map(int, v)) for k, v in _table(target / "bounding_boxes.txt").items()}
    images = _table(target / "images.txt")
    differences = []
    for image_id, (rel,) in images.items():
        pixels = np.asarray(Image.open(target / "images" / rel), float)
        x, y, w, h = boxes[image_id]
        inside = np.zeros(pixels.shape[:2], bool)
        inside[y:y + h, x:x + w] = True
        ring = np.zeros_like(inside)
        pad = max(4, min(w, h) // 4)
        ring[max(0, y - pad):y + h + pad, max(0, x - pad):x + w + pad] = True
        ring &= ~inside
        differences.append(np.abs(pixels[inside].mean(0) - pixels[ring].mean(0)).sum())
    # Birds are drawn in colours of their own, so the box rarely looks like its surroundings.
    assert np.median(differences) > 25
    assert np.mean(np.array(differences) > 10) > 0.8


def _scene(seed: int, **changes) -> demo.Scene:
    scene = demo.sample_scene(np.random.default_rng(seed), 128, 160)
    return demo.Scene(**{**scene.__dict__, **changes})


def test_box_is_the_exact_extent_of_the_bird():
    tax = demo.design_taxonomy("target", 10, seed=0)
    for k, species in enumerate(tax.species[:5]):
        scene = _scene(k, occluders=0)
        with_bird, box = demo.render_image(species, scene)
        without, box_again = demo.render_image(species, scene, draw_bird=False)
        assert box == box_again
        changed = np.abs(with_bird.astype(int) - without).max(-1) > 0
        ys, xs = np.nonzero(changed)
        x, y, w, h = box
        # Every changed pixel lies in the box, and the changes reach all four of its edges.
        assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
        assert xs.min() <= x + 1 and ys.min() <= y + 1
        assert xs.max() >= x + w - 2 and ys.max() >= y + h - 2


def test_congeners_differ_only_in_small_designed_details():
    tax = demo.design_taxonomy("target", 10, seed=0)
    by_genus: dict[str, list[demo.Species]] = {}
    for species in tax.species:
        by_genus.setdefault(species.genus.name, []).append(species)
    assert all(len(group) >= 2 for group in by_genus.values())
    for group in by_genus.values():
        a, b = group[0], group[1]
        differing = {f for f in demo.FEATURES if a.features[f] != b.features[f]}
        assert 1 <= len(differing) <= 2 and differing <= set(a.varying)
        for k in range(3):
            scene = _scene(100 + k)
            pa, box_a = demo.render_image(a, scene)
            pb, box_b = demo.render_image(b, scene)
            changed = np.abs(pa.astype(int) - pb).max(-1) > 24
            x0 = min(box_a[0], box_b[0])
            y0 = min(box_a[1], box_b[1])
            x1 = max(box_a[0] + box_a[2], box_b[0] + box_b[2])
            y1 = max(box_a[1] + box_a[3], box_b[1] + box_b[3])
            outside = changed.copy()
            outside[y0:y1, x0:x1] = False
            # Same scene, same genus: the photos differ only on the bird, and only a little.
            assert changed.sum() > 0 and not outside.any()
            assert changed.sum() < 0.12 * box_a[2] * box_a[3], differing


def test_genera_differ_in_more_than_details():
    tax = demo.design_taxonomy("target", 10, seed=0)
    a = tax.species[0]
    b = next(s for s in tax.species if s.genus.name != a.genus.name)
    scene = _scene(7)
    pa, box = demo.render_image(a, scene)
    pb, _ = demo.render_image(b, scene)
    changed = np.abs(pa.astype(int) - pb).max(-1) > 24
    assert changed.sum() > 0.3 * box[2] * box[3]


def test_species_json_describes_every_species(target):
    info = json.loads((target / "species.json").read_text())
    classes = _classes(target)
    leaves = {int(v[0]) for v in _table(target / "image_class_labels.txt").values()}
    assert {s["class_id"] for s in info["species"]} == leaves
    for entry in info["species"]:
        assert classes[entry["class_id"]] == entry["name"]
        assert set(entry["features"]) == set(demo.FEATURES)
        for feature, value in entry["features"].items():
            assert value in demo.FEATURES[feature]
        congeners = [s for s in info["species"] if s["genus"] == entry["genus"]]
        for other in congeners:
            assert other["genus_colours"] == entry["genus_colours"]
            differing = {f for f in demo.FEATURES
                         if other["features"][f] != entry["features"][f]}
            assert differing <= set(entry["distinguishing"])
            assert other is entry or differing
    assert "SYNTHETIC" in (target / "README.txt").read_text()


def test_failure_leaves_no_partial_dataset(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "previous.txt").write_text("old dataset")
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real_render(*args, **kwargs)

    real_render = demo.render_image
    monkeypatch.setattr(demo.dataset, "render_image", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.generate_demo_dataset(out, variant="target", seed=0, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]

    monkeypatch.setattr(demo.dataset, "render_image", real_render)
    summary = demo.generate_demo_dataset(out, variant="target", seed=0, **SMALL)
    assert summary["num_images"] == 30 and summary["num_train"] == 18
    assert not (out / "previous.txt").exists() and (out / "images.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        demo.generate_demo_dataset(tmp_path / "x", variant="cub")
    with pytest.raises(ValueError, match="num_classes"):
        demo.generate_demo_dataset(tmp_path / "x", num_classes=1)
    with pytest.raises(ValueError, match="min_side"):
        demo.generate_demo_dataset(tmp_path / "x", min_side=200, max_side=100)
    assert not (tmp_path / "x").exists()


def test_script_writes_a_dataset_the_reader_accepts(tmp_path, repo_root, capsys):
    from helpers.scripts import load_script
    script = load_script("make_demo_dataset")
    out = tmp_path / "source"
    settings = {"num_classes": 4, "train_per_class": 2, "test_per_class": 1, "seed": 5}
    assert script.main(["--out", str(out), "--variant", "source",
                        "--settings", json.dumps(settings)]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 12

    readers = pytest.importorskip("finegrained.data.readers")
    dataset = readers.read_dataset("nabirds", out)
    assert dataset.images.num_rows == 12 and dataset.num_classes == 4
