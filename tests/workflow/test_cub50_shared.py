"""A small version of the cub50 example (config/examples/cub50.yaml) on the real photos and
weights in ../shared: the whole photo as the crop (cub50 has no boxes), pooled MobileNetV2
features of the evaluation view, the L-BFGS linear probe, test top-1 per starting weights.

The pieces are the pipeline's own (crop decoder, target-model init, centre view, probe
solver), on 8 species at 112 px: about 35 s of CPU time on 2 cores (2-4 min of wall time
when the machine is shared and busy).
The full-size figures: docs/results-cub50.md.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

NUM_SPECIES = 8
CROP_SIZE, IMAGE_SIZE, CROP_FRACTION = 128, 112, 0.875
BATCH = 120
WEIGHTS = {"inat_birds": "mobilenet_v2_1.0_224_inat_birds.npz",
           "imagenet": "mobilenet_v2_1.0_224_imagenet.npz"}


@pytest.fixture(scope="module")
def subset(cub50):
    """Stored crops and labels of the first species: official train and test photos."""
    from finegrained.data.imageio import load_crop
    from finegrained.data.readers import read_dataset

    dataset = read_dataset("cub", cub50)
    images = dataset.images.to_pydict()
    out = {}
    for split, flag in (("train", True), ("test", False)):
        rows = [(path, label) for path, label, is_train in
                zip(images["path"], images["label"], images["is_train"])
                if label < NUM_SPECIES and bool(is_train) == flag]
        pixels = np.stack([load_crop(cub50 / path, None, CROP_SIZE, 0.15, "square")
                           for path, _ in rows])
        out[split] = (pixels, np.array([label for _, label in rows], np.int32))
    return out


def _probe_top1(weights_file, splits) -> float:
    import jax
    from flax import nnx

    from finegrained.models import assign_state, build_model, to_flat
    from finegrained.models.weights import read_tensors
    from finegrained.train.augment import center_crop
    from finegrained.train.probe import fit_probe

    # the pretrained network as the init rule loads it, its own classifier kept (unused:
    # the probe reads the pooled features); built abstractly, as loading fills every tensor
    tensors = to_flat(read_tensors(weights_file), "mobilenet_v2")
    num_source = tensors["head/bias"].shape[0]
    model = nnx.eval_shape(lambda: build_model("mobilenet_v2", num_source, rngs=nnx.Rngs(0)))
    assign_state(model, tensors)
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, images):
        net = nnx.merge(graphdef, state)
        return net.pooled_features(center_crop(images, IMAGE_SIZE, CROP_FRACTION))

    def features(pixels, batch=BATCH):
        padded = np.concatenate([pixels, np.zeros((-len(pixels) % batch,) + pixels.shape[1:],
                                                  pixels.dtype)])   # one compiled shape
        return np.concatenate([np.asarray(pooled(state, padded[i:i + batch]))
                               for i in range(0, len(padded), batch)])[:len(pixels)]

    feats = {split: features(pixels) for split, (pixels, _) in splits.items()}
    (train_x, train_y), test_y = (feats["train"], splits["train"][1]), splits["test"][1]
    # no validation split here: the fixed middle strength of the config's grid
    probe = fit_probe(train_x, train_y, train_x, train_y, NUM_SPECIES, l2_grid=[1e-3])
    logits = feats["test"] @ probe["kernel"] + probe["bias"]
    return float(np.mean(np.argmax(logits, -1) == test_y))


@pytest.mark.slow(seconds=40)
def test_cub50_linear_probe_inat_beats_imagenet(shared_weights, subset):
    splits = subset
    assert len(splits["train"][1]) == 30 * NUM_SPECIES
    top1 = {key: _probe_top1(shared_weights / file, splits)
            for key, file in WEIGHTS.items()}
    print(f"cub50, {NUM_SPECIES} species, {IMAGE_SIZE} px, linear probe test top-1: {top1}")
    chance = 1 / NUM_SPECIES
    assert top1["imagenet"] > 0.6 > 4 * chance
    assert top1["inat_birds"] > 0.85
    assert top1["inat_birds"] > top1["imagenet"]


def test_cub50_example_configs_validate(repo_root):
    """The example configs (and the ImageNet override the docs give) pass the schema; runs
    without ../shared."""
    from finegrained.plan.schema import load_config

    # Snakemake reads config/config.yaml first (the Snakefile's configfile), then these
    default, examples = repo_root / "config" / "config.yaml", repo_root / "config" / "examples"
    base = load_config(default, examples / "cub50.yaml")
    assert base["dataset"]["format"] == "cub" and base["backbone"]["arch"] == "mobilenet_v2"
    assert base["train"]["image_size"] == 224
    small = load_config(default, examples / "cub50.yaml", examples / "cub50-112px.yaml", overrides={
        "run_name": "cub50_imagenet_112px",
        "backbone": {"weights": "../shared/weights/mobilenet_v2_1.0_224_imagenet.npz"}})
    assert small["train"]["image_size"] == 112 and small["crop"]["size"] == 128
    assert small["backbone"]["arch"] == "mobilenet_v2"      # merged key by key
    assert small["regime_settings"]["full_finetune"]["backbone_lr_mult"] == 0.1
    # every combination `make cub50` runs (docs/results-cub50.md)
    from finegrained.plan.protocol import check_protocol, train_variants
    combos = {("cub50-112px.yaml", "cub50-112px-sweep.yaml"): "cub50_inat_112px",
              ("cub50-112px.yaml", "cub50-112px-imagenet.yaml"): "cub50_imagenet_112px",
              ("cub50-112px-sgd-probe.yaml",): "cub50_inat_112px_sgd_probe",
              ("cub50-112px-sgd-probe.yaml", "cub50-112px-sgd-probe-augmented.yaml"):
                  "cub50_inat_112px_sgd_probe_aug"}
    for overlays, run_name in combos.items():
        config = load_config(default, examples / "cub50.yaml", *(examples / o for o in overlays))
        check_protocol(config)
        assert config["run_name"] == run_name and config["train"]["image_size"] == 112
    # the systems comparison on cub50: the demo's systems in a run folder of their own
    systems = load_config(default, examples / "cub50.yaml", examples / "cub50-112px.yaml",
                          examples / "systems.yaml", examples / "cub50-112px-systems.yaml")
    check_protocol(systems)
    assert systems["run_name"] == "cub50_inat_112px_systems" and len(systems["systems"]) == 5
    assert systems["dataset"]["format"] == "cub" and systems["train"]["num_devices"] == 4
    assert len(train_variants(systems, "full_finetune")) == 3
    swept = load_config(default, examples / "cub50.yaml", examples / "cub50-112px.yaml",
                        examples / "cub50-112px-sweep.yaml")
    assert train_variants(swept, "two_stage") == ["+backbone_lr_mult=1.0", "+backbone_lr_mult=0.1"]
    augmented = load_config(default, examples / "cub50.yaml",
                            examples / "cub50-112px-sgd-probe.yaml",
                            examples / "cub50-112px-sgd-probe-augmented.yaml")
    probe = augmented["regime_settings"]["linear_probe"]
    assert probe["solver"] == "sgd" and probe["augment"]["crop_area"] == [0.25, 1.0]
    # the ViT rows `make cub50-vit` fills where the Hub can be reached (#27)
    for overlay, arch, pool in (("cub50-dinov2.yaml", "vit_small_patch14", "cls+mean"),
                                ("cub50-vit-b16.yaml", "vit_base_patch16", "cls")):
        vit = load_config(default, examples / "cub50.yaml", examples / overlay)
        backbone, full = vit["backbone"], vit["regime_settings"]["full_finetune"]
        assert (backbone["arch"], backbone["pool"]) == (arch, pool)
        assert backbone["weights"].startswith("https://huggingface.co/")
        assert (full["optimizer"], full["layer_decay"], full["backbone_lr_mult"]) == (
            "adamw", 0.65, 1.0)
        assert vit["regime_settings"]["two_stage"]["head_from"] == "linear_probe"
