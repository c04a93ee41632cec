"""The device check: everything the GPU path needs measured, in one command of a few minutes.

Run on a GPU machine (the project's device tool lends one for about 15 minutes in all):

    make device-bundle                       # here: weights (+ wheels) into .device/
    python benchmarks/device_check.py --bundle .device --out device_check.json

``--smoke`` runs every section at toy sizes on any backend (the test suite does, on the
CPU, so the script cannot rot before a GPU is lent). Sections, in order of importance; each
runs in a process of its own (a fresh device, its own peak memory, an out-of-memory failure
that stops one row only), and a section is skipped when the time left (``--budget``, seconds)
is below its estimate. The JSON is rewritten after every section, so a run stopped early
still leaves what it measured:

1. ``environment``: JAX, the devices, the backend and its memory.
2. ``mobilenet_reference``: the real MobileNetV2 weights (ImageNet and iNat birds) on
   ``bird.bmp``, float32 and bfloat16, against ``expected_outputs.json`` (top-5, max abs
   logit difference); the depthwise form ``auto`` picked and its agreement with the other.
3. ``train``: train-step images/s at 224 px (ResNet-50, MobileNetV2; bfloat16, float32) at
   the batch sizes of ``config/examples/gpu.yaml``, through the pipeline's own loop: random
   256 px crops in NPY shards on disk, the memory-mapped reader and the prefetch thread,
   the default on-device augmentation with PCA lighting; images/s and input-wait fraction
   of the second epoch, time to the first step, peak device memory.
4. ``ten_crop``: 10-crop test-time evaluation images/s (ResNet-50, bfloat16).
5. ``compile_cache``: the same train job twice in fresh processes sharing a persistent
   compilation cache: time to the first step, cold and warm.
6. ``batch_memory``: ResNet-50 bfloat16 train step at growing batches: peak memory and
   images/s (what fills an 80-141 GB card).
7. ``xla_flags``: ResNet-50 bfloat16 images/s with each candidate XLA flag against none.

``benchmarks/render.py`` turns the JSON into the GPU section of ``docs/benchmarks.md``
(copy it to ``benchmarks/results/device_check.json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from finegrained.launch import cache_env  # noqa: E402  (standard library only: no JAX here)
STORED, IMAGE = 256, 224
#: Batch per configuration for a GPU of 80-141 GB (config/examples/gpu.yaml's choices).
GPU_BATCH = {("resnet50", "bfloat16"): 256, ("resnet50", "float32"): 128,
             ("mobilenet_v2", "bfloat16"): 512, ("mobilenet_v2", "float32"): 256,
             ("vit_base_patch16", "bfloat16"): 256, ("vit_small_patch14", "bfloat16"): 256}
#: The ViTs whose training step and feature extraction the check measures (issue #27):
#: ViT-B/16 (AugReg) and DINOv2 ViT-S/14, at 224 px.
VITS = ("vit_base_patch16", "vit_small_patch14")
FEATURES_BATCH = 1024
XLA_CANDIDATES = ["--xla_gpu_enable_latency_hiding_scheduler=true",
                  "--xla_gpu_triton_gemm_any=true",
                  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,CUSTOM_CALL",
                  "--xla_gpu_autotune_level=0"]
#: Seconds each section is expected to take on an H100/H200 (skipped below that).
ESTIMATE_S = {"environment": 5, "mobilenet_reference": 40, "train": 300, "ten_crop": 50,
              "features": 60, "compile_cache": 90, "batch_memory": 90, "xla_flags": 120}
TARGETS = {"resnet50_bfloat16_images_per_s": 5000, "mobilenet_v2_bfloat16_images_per_s": 8000,
           "vit_base_patch16_bfloat16_images_per_s": 3000,
           "vit_small_patch14_features_images_per_s": 10000, "input_wait_fraction": 0.05}


# ----------------------------------------------------------------------------- helpers

def write_random_shards(folder: Path, count: int, stored: int, classes: int, seed: int = 0,
                        per_shard: int = 1024) -> Path:
    """A split of ``count`` random uint8 crops in NPY shards + Parquet labels, with the index
    ``ShardReader`` reads (the pixels do not matter for a throughput figure)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for i, start in enumerate(range(0, count, per_shard)):
        n = min(per_shard, count - start)
        images = np.lib.format.open_memmap(folder / f"shard-{i:05d}.npy", mode="w+",
                                           dtype=np.uint8, shape=(n, stored, stored, 3))
        for j in range(0, n, 128):
            images[j:j + 128] = rng.integers(0, 256, images[j:j + 128].shape, dtype=np.uint8)
        images.flush()
        del images
        pq.write_table(pa.table({"label": rng.integers(0, classes, n).astype(np.int32)}),
                       folder / f"shard-{i:05d}.parquet")
        shards.append({"meta": f"shard-{i:05d}.parquet", "meta_sha256": None,
                       "images": f"shard-{i:05d}.npy", "images_sha256": None, "count": n})
    index = folder / "index.json"
    index.write_text(json.dumps({"split": folder.name, "image_size": stored, "format": "npy",
                                 "count": count, "shards": shards}))
    return index


def random_model(arch: str, width: int, classes: int, stage_depths=None):
    """The architecture with random He-normal weights set from numpy: built abstractly, so
    no per-tensor initialisation program is compiled (the figures do not depend on the
    values)."""
    import numpy as np
    from flax import nnx

    from finegrained.models import assign_state, build_model

    model = nnx.eval_shape(lambda: build_model(arch, classes, width=width,
                                               stage_depths=stage_depths, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        name, shape = "/".join(map(str, path)), variable.get_value().shape
        flat[name] = (rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
                      if name.endswith("/kernel") else
                      np.ones(shape) if name.endswith(("/scale", "/var")) else np.zeros(shape))
    assign_state(model, flat)
    return model


def peak_memory() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------- sections
# Each runs in a child process (``--child NAME '<json>'``) and returns a JSON-able dict.

def environment(_args: dict) -> dict:
    import jax
    import jaxlib
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device_kind": device.device_kind,
            "memory_bytes_limit": stats.get("bytes_limit"),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def mobilenet_reference(args: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from PIL import Image

    from finegrained.models import assign_state, build_model, to_flat
    from finegrained.models.depthwise import resolve
    from finegrained.train.steps import set_compute_dtype

    weights = Path(args["weights"])
    expected = json.loads((weights / "expected_outputs.json").read_text())
    image = Image.open(weights / "bird.bmp").convert("RGB").resize((224, 224),
                                                                   Image.Resampling.BILINEAR)
    bird = np.asarray(image, np.uint8)[None]
    out = {"depthwise_auto": resolve("auto")}
    networks = [("mobilenet_v2_1.0_224_imagenet", 1001), ("mobilenet_v2_1.0_224_inat_birds", 965)]
    for name, classes in networks[:args.get("networks", 2)]:
        with np.load(weights / f"{name}.npz") as npz:
            flat = to_flat({k: npz[k] for k in npz.files}, "mobilenet_v2")
        reference = expected[name]
        want = np.asarray(reference["float_logits_full"], np.float32)
        top5 = [e["index"] for e in reference["float_forward_top5"]]
        rows, logits_of = {}, {}
        # compiled whole, as training and evaluation run it (one program per form and dtype
        # rather than one per layer shape)
        forward = nnx.jit(lambda model, x: model(x))
        for impl in ("shifted", "grouped"):
            model = nnx.eval_shape(lambda: build_model("mobilenet_v2", classes, rngs=nnx.Rngs(0),
                                                       depthwise_impl=impl))
            assign_state(model, flat)
            for dtype in ("float32", "bfloat16"):
                if dtype == "bfloat16":
                    set_compute_dtype(model, jnp.bfloat16)
                logits = logits_of[impl, dtype] = np.asarray(forward(model, bird), np.float32)[0]
                got = [int(i) for i in np.argsort(-logits)[:5]]
                rows[f"{impl}/{dtype}"] = {
                    "top5": got, "top5_matches": got == top5, "top1_matches": got[0] == top5[0],
                    "top5_same_set": sorted(got) == sorted(top5),
                    "max_abs_logit_diff": float(np.max(np.abs(logits - want)))}
        rows["shifted_vs_grouped_float32_max_abs_diff"] = float(np.max(np.abs(
            logits_of["shifted", "float32"] - logits_of["grouped", "float32"])))
        out[name] = rows
    return out


def train(args: dict) -> dict:
    """One configuration of the pipeline's training loop on random shards from disk."""
    import jax

    import numpy as np

    from finegrained.data.shards import ShardReader
    from finegrained.train.augment import Lighting
    from finegrained.train.loop import fit
    from finegrained.train.settings import default_settings

    folder = Path(args["data"])
    train_index = write_random_shards(folder / "train", args["images"], args["stored"],
                                      args["classes"])
    val_index = write_random_shards(folder / "val", args["batch"], args["stored"],
                                    args["classes"], seed=1)
    # The schema's default augmentation (random-resized crop, flip, colour jitter, PCA
    # lighting), as every training job of the workflow draws it.
    settings = default_settings(epochs=args["epochs"], batch_size=args["batch"],
                                image_size=args["image"], compute_dtype=args["dtype"],
                                warmup_epochs=0, log_every_steps=0, num_devices=1,
                                prefetch_batches=4)
    lighting = Lighting(np.array([0.2, 0.02, 0.005], np.float32), np.eye(3, dtype=np.float32))
    model = random_model(args["arch"], args["width"], args["classes"], args.get("stage_depths"))
    result = fit(model, ShardReader(train_index), ShardReader(val_index), settings, log_fn=None,
                 lighting=lighting)
    last = result.history[-1]
    return {"arch": args["arch"], "dtype": args["dtype"], "batch": args["batch"],
            "images_per_second": last["images_per_second"],
            "input_wait_fraction": last["input_wait_fraction"],
            "first_step_seconds": result.history[0]["first_step_seconds"],
            "epochs": [{k: h[k] for k in ("images_per_second", "input_wait_fraction",
                                           "seconds")} for h in result.history],
            "peak_memory_bytes": peak_memory(), "device": str(jax.devices()[0])}


def ten_crop(args: dict) -> dict:
    import jax

    from finegrained.data.shards import ShardReader
    from finegrained.evaluate.job import predict_views
    from finegrained.evaluate.views import view_boxes
    from finegrained.train.steps import resolve_compute_dtype, set_compute_dtype

    index = write_random_shards(Path(args["data"]) / "test", args["images"], args["stored"],
                                args["classes"])
    reader = ShardReader(index)
    model = random_model(args["arch"], args["width"], args["classes"], args.get("stage_depths"))
    model.eval()
    set_compute_dtype(model, resolve_compute_dtype(args["dtype"]))
    views = {"ten_crop": view_boxes("ten_crop", args["stored"], args["stored"],
                                    crop_fraction=0.875)}
    kwargs = dict(image_size=args["image"], average="softmax", batch_size=args["batch"],
                  log=lambda _: None)
    predict_views(model, reader, views, **kwargs)         # compile
    start = time.perf_counter()
    predict_views(model, reader, views, **kwargs)
    seconds = time.perf_counter() - start
    return {"arch": args["arch"], "dtype": args["dtype"], "batch": args["batch"],
            "images_per_second": len(reader) / seconds, "windows_per_image": 10,
            "peak_memory_bytes": peak_memory(), "device": str(jax.devices()[0])}


def features(args: dict) -> dict:
    """The features rule's pass (the frozen backbone to its pooled output, float16 cache)
    over random shards, timed on its second run."""
    import jax

    from finegrained.train.features import extract_features
    from finegrained.train.steps import resolve_compute_dtype, set_compute_dtype

    folder = Path(args["data"])
    index = write_random_shards(folder / "shards", args["images"], args["stored"],
                                args["classes"])
    model = random_model(args["arch"], args["width"], args["classes"], args.get("stage_depths"))
    set_compute_dtype(model, resolve_compute_dtype(args["dtype"]))
    layer = model.stage_names[-2]
    kwargs = dict(layers=[layer], image_size=args["image"], eval_crop_fraction=0.875,
                  batch_size=args["batch"], dtype="float16")
    extract_features(model, index, folder / "warm", **kwargs)          # compile
    start = time.perf_counter()
    extract_features(model, index, folder / "timed", **kwargs)
    seconds = time.perf_counter() - start
    return {"arch": args["arch"], "dtype": args["dtype"], "batch": args["batch"],
            "layer": layer, "images_per_second": args["images"] / seconds,
            "peak_memory_bytes": peak_memory(), "device": str(jax.devices()[0])}


SECTIONS = {"environment": environment, "mobilenet_reference": mobilenet_reference,
            "train": train, "ten_crop": ten_crop, "features": features}


# ----------------------------------------------------------------------------- driver

def unpack_missing(wheels: Path, site: Path) -> list[str]:
    """Unpack into ``site`` each wheel of ``wheels`` (made by `make device-bundle`: the
    library's dependencies for Python 3.12, compiled ones included) whose distribution this
    interpreter lacks; the names unpacked. A wheel is a zip archive laid out as installed, so
    unpacking is installing; distributions the machine has are left to it, never shadowed."""
    unpacked = []
    for wheel in sorted(wheels.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            unpacked.append(name)
    return unpacked


class Check:
    def __init__(self, out: Path, budget: float, smoke: bool, bundle: Path | None,
                 scratch: Path):
        self.out, self.smoke, self.bundle, self.scratch = out, smoke, bundle, scratch
        unpacked = unpack_missing(bundle / "wheels", scratch / "site") if bundle else []
        self.site = [scratch / "site"] if unpacked else []
        self.deadline = time.monotonic() + budget
        self.result: dict = {"benchmark": "device_check", "smoke": smoke,
                             "command": " ".join(["python benchmarks/device_check.py",
                                                  *sys.argv[1:]]),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "targets": TARGETS, "sections": {}, "skipped": {},
                             "from_bundle": unpacked}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        os.replace(tmp, self.out)

    def child(self, name: str, args: dict, env: dict | None = None) -> dict:
        """Run section ``name`` in a fresh process; its JSON, or ``{"error": ...}``. The
        children share a persistent compilation cache (``env`` may name another), so a
        configuration measured twice compiles once."""
        command = [sys.executable, __file__, "--child", name, json.dumps(args)]
        path = os.pathsep.join(map(str, [REPO / "src", *self.site]))
        environ = {**os.environ, "PYTHONPATH": path,
                   **cache_env(self.scratch / "jax_cache_shared"), **(env or {})}
        try:
            proc = subprocess.run(command, env=environ, capture_output=True, text=True,
                                  timeout=max(30.0, self.left()))
        except subprocess.TimeoutExpired:
            return {"error": "timed out (the budget ran out)"}
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                    else f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def section(self, name: str, run) -> None:
        estimate = 1 if self.smoke else ESTIMATE_S[name]
        if self.left() < estimate:
            self.result["skipped"][name] = f"{self.left():.0f} s left, {estimate} s needed"
            self.save()
            return
        start = time.monotonic()
        value = run()
        self.result["sections"][name] = {"seconds": round(time.monotonic() - start, 1),
                                         "result": value}
        self.save()
        print(f"{name}: {time.monotonic() - start:.0f} s", flush=True)

    # --- the sizes of a run
    def train_args(self, arch: str, dtype: str, **extra) -> dict:
        if self.smoke:       # the same code at toy sizes: shallow networks, 32 px, 4 steps
            depths = {"resnet50": [1, 1, 1, 1], "mobilenet_v2": [1] * 7, "vit_base_patch16": [2],
                      "vit_small_patch14": [2]}
            args = {"arch": "resnet18" if arch == "resnet50" else arch, "width": 8,
                    "stage_depths": depths.get(arch), "image": 32, "stored": 36, "batch": 8,
                    "images": 32, "epochs": 2, "classes": 10}
        else:
            batch = GPU_BATCH[(arch, dtype)]
            args = {"arch": arch, "width": 64, "image": IMAGE, "stored": STORED, "batch": batch,
                    "images": max(16 * batch, 4096), "epochs": 2, "classes": 555}
        return {**args, "dtype": dtype, "data": str(self.scratch / f"{arch}-{dtype}"), **extra}

    def run(self) -> dict:
        self.section("environment", lambda: self.child("environment", {}))
        env = self.result["sections"]["environment"]["result"]
        self.result["machine"] = {"cpu": platform.processor() or platform.machine(),
                                  "cores": os.cpu_count(),
                                  "device": f"{len(env.get('devices', []))} x "
                                            f"{env.get('device_kind', '?')}"}
        weights = self.bundle / "weights" if self.bundle else None
        if weights and (weights / "expected_outputs.json").exists():
            self.section("mobilenet_reference", lambda: self.child(
                "mobilenet_reference", {"weights": str(weights), "networks": 1 if self.smoke else 2}))
        else:
            self.result["skipped"]["mobilenet_reference"] = f"no weights in {weights}"
        configs = ([("resnet50", "bfloat16"), ("mobilenet_v2", "float32"),
                    ("vit_small_patch14", "bfloat16")] if self.smoke else
                   [(a, d) for d in ("bfloat16", "float32") for a in ("resnet50", "mobilenet_v2")]
                   + [(vit, "bfloat16") for vit in VITS])
        self.section("train", lambda: {f"{arch}/{dtype}": self.child("train", self.train_args(
            arch, dtype)) for arch, dtype in configs})
        self.section("ten_crop", lambda: self.child("ten_crop", self.train_args(
            "resnet50", "bfloat16", images=64 if self.smoke else 2048)))
        self.section("features", lambda: {vit: self.child("features", self.train_args(
            vit, "bfloat16", batch=8 if self.smoke else FEATURES_BATCH,
            images=32 if self.smoke else 8 * FEATURES_BATCH)) for vit in VITS})
        self.section("compile_cache", self.compile_cache)
        self.section("batch_memory", self.batch_memory)
        self.section("xla_flags", self.xla_flags)
        self.result["verdict"] = verdict(self.result)
        self.save()
        return self.result

    def compile_cache(self) -> dict:
        env = cache_env(self.scratch / "jax_cache_fresh")       # nothing compiled in it yet
        args = self.train_args("resnet50", "bfloat16", epochs=1)
        args["images"] = args["batch"] * 2
        cold = self.child("train", args, env)
        warm = self.child("train", args, env)
        ratio = (cold["first_step_seconds"] / warm["first_step_seconds"]
                 if "error" not in cold and "error" not in warm else None)
        return {"cold_first_step_s": cold.get("first_step_seconds"),
                "warm_first_step_s": warm.get("first_step_seconds"), "cold_over_warm": ratio,
                "errors": [r["error"] for r in (cold, warm) if "error" in r]}

    def batch_memory(self) -> dict:
        sizes = [8] if self.smoke else [128, 256, 512, 768]
        rows = {}
        for batch in sizes:
            if self.left() < (1 if self.smoke else 40):
                break
            args = self.train_args("resnet50", "bfloat16", batch=batch)
            args["images"] = batch * (4 if self.smoke else 6)
            rows[batch] = self.child("train", args)
        return rows

    def xla_flags(self) -> dict:
        rows = {}
        for flags in [""] + (XLA_CANDIDATES[:1] if self.smoke else XLA_CANDIDATES):
            if self.left() < (1 if self.smoke else 40):
                break
            args = self.train_args("resnet50", "bfloat16")
            args["images"] = args["batch"] * (4 if self.smoke else 12)
            # each candidate on top of the machine's own flags (none on a GPU machine; the
            # test suite's on the CPU)
            machine = os.environ.get("XLA_FLAGS", "")
            rows[flags or "(none)"] = self.child("train", args, {
                "XLA_FLAGS": " ".join(filter(None, [machine, flags]))})
        return rows


def verdict(result: dict) -> dict:
    """Each target against what was measured (None: not measured)."""
    train_rows = (result["sections"].get("train") or {}).get("result", {})

    def ips(key):
        row = train_rows.get(key) or {}
        return row.get("images_per_second")

    r50, mnv2 = ips("resnet50/bfloat16"), ips("mobilenet_v2/bfloat16")
    vitb = ips("vit_base_patch16/bfloat16")
    features = (result["sections"].get("features") or {}).get("result", {})
    dinov2 = (features.get("vit_small_patch14") or {}).get("images_per_second")
    waits = [row.get("input_wait_fraction") for row in train_rows.values()
             if isinstance(row, dict) and row.get("input_wait_fraction") is not None]
    return {"resnet50_bfloat16_images_per_s": r50,
            "resnet50_target_met": None if r50 is None or result["smoke"] else
            r50 >= TARGETS["resnet50_bfloat16_images_per_s"],
            "mobilenet_v2_bfloat16_images_per_s": mnv2,
            "mobilenet_v2_target_met": None if mnv2 is None or result["smoke"] else
            mnv2 >= TARGETS["mobilenet_v2_bfloat16_images_per_s"],
            "vit_base_patch16_bfloat16_images_per_s": vitb,
            "vit_base_patch16_target_met": None if vitb is None or result["smoke"] else
            vitb >= TARGETS["vit_base_patch16_bfloat16_images_per_s"],
            "vit_small_patch14_features_images_per_s": dinov2,
            "vit_small_patch14_features_target_met": None if dinov2 is None or result["smoke"]
            else dinov2 >= TARGETS["vit_small_patch14_features_images_per_s"],
            "max_input_wait_fraction": max(waits) if waits else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / ".device",
                   help="folder made by `make device-bundle` (weights/, wheels/)")
    p.add_argument("--out", type=Path, default=Path("device_check.json"))
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    p.add_argument("--smoke", action="store_true", help="toy sizes, any backend (the tests)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where the random shards go (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("SECTION", "ARGS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, section_args = args.child
        print(json.dumps(SECTIONS[name](json.loads(section_args))))
        return 0
    with tempfile.TemporaryDirectory(prefix="device-check-") as folder:
        scratch = args.scratch or Path(folder)
        check = Check(args.out, args.budget, args.smoke, args.bundle, scratch)
        result = check.run()
    print(json.dumps(result["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
