# Quick start: `make demo` (install + whole pipeline on the embedded demo dataset),
# `make test` (install + test suite). Both need only python3 on the machine.
#
# JAX build: GPU=cuda12 (the CUDA 12 build, envs/requirements-cuda12.lock) or GPU=cpu
# (envs/requirements.lock). Unset: cuda12 when `nvidia-smi -L` lists a GPU, else cpu; every
# make target says in one line which build it installs and how to choose the other.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SNAKEMAKE := $(VENV)/bin/snakemake
# Rules call `python scripts/...`: put the project environment first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
CORES ?= 2
# Test-only reference implementations: PyTorch for the ResNet weight-conversion tests,
# Hugging Face transformers (on PyTorch) for the ViT and DINOv2 ones. `make test TORCH=`
# or `TRANSFORMERS=` skips one (its tests then skip).
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers==5.25.0
# Where pip looks for it; e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine
# whose default index would bring the CUDA build.
TORCH_INDEX ?=
GPU ?=
DETECTED_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo cuda12 || echo cpu)
JAX_BUILD := $(or $(GPU),$(DETECTED_GPU))
ifeq ($(filter $(JAX_BUILD),cpu cuda12),)
$(error GPU=$(GPU): choose GPU=cpu or GPU=cuda12)
endif
LOCK := $(if $(filter cuda12,$(JAX_BUILD)),envs/requirements-cuda12.lock,envs/requirements.lock)
OTHER_BUILD := $(if $(filter cuda12,$(JAX_BUILD)),cpu,cuda12)
WHY := $(if $(GPU),as GPU=$(GPU) asks,$(if $(filter cuda12,$(DETECTED_GPU)),nvidia-smi lists a GPU,no NVIDIA GPU found by nvidia-smi))
STAMP := $(VENV)/.installed-$(JAX_BUILD)

.PHONY: install jax-build demo test test-demo test-slurm lint dry-run report bench cub50 \
	cub50-vit clean-demo device-bundle device-check

jax-build:
	@echo "JAX build: $(JAX_BUILD) ($(WHY)); for the $(OTHER_BUILD) build: make <target> GPU=$(OTHER_BUILD)"

$(STAMP): pyproject.toml envs/requirements.lock $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(filter cpu,$(JAX_BUILD)),$(PIP) uninstall -q -y jax-cuda12-plugin jax-cuda12-pjrt 2>/dev/null || true)
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: jax-build $(STAMP)

demo: install
	$(SNAKEMAKE) all --configfile config/demo.yaml --cores $(CORES)
	@echo; $(PY) scripts/show_results.py results/demo --report-command "make report"

# The test suite in TEST_WORKERS pytest-xdist processes (TEST_WORKERS=1: in this one): each
# test file goes whole to one of them (its fixtures are made once), files with `slow` tests
# first (tests/conftest.py). Both targets end with the 15 slowest tests.
TEST_WORKERS ?= 2
# The suite compiles at XLA's CPU optimisation level 0 (tests/helpers/xla.py); the demo tests
# train for minutes, as `make demo` does, at the default level.
TEST_XLA_DEFAULT := FINEGRAINED_TEST_XLA_FLAGS=
PYTEST := $(PY) -m pytest -q --durations=15 $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: install
	@if [ -n "$(TORCH)" ]; then $(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)" || echo "note: $(TORCH) not installable; torch reference tests will skip"; fi
	@if [ -n "$(TORCH)" ] && [ -n "$(TRANSFORMERS)" ]; then $(PIP) install -q "$(TRANSFORMERS)" || echo "note: $(TRANSFORMERS) not installable; the ViT reference tests will skip"; fi
	$(PYTEST) -m "not demo" tests

# The real demo configuration trained through Snakemake, a kill -9 and the resumed rerun
# with the ViT demo at 48 px (about 11 minutes on 2 cores; CI runs it after `make test`).
test-demo: install
	$(TEST_XLA_DEFAULT) $(PY) -m pytest -q --durations=15 -m demo tests

# The pipeline on a real SLURM (about 40 min on a busy 2-core machine; not in `make test`):
# as root, installs Debian's slurm-wlm + munge if missing, starts a one-node cluster with
# four fake GPUs (tests/workflow/slurm/cluster.sh; `tests/workflow/slurm/cluster.sh stop` ends it), runs the
# shortened demo locally and through profiles/slurm, and compares (tests/workflow/test_slurm.py).
SLURM_TEST_DIR ?= /tmp/finegrained-slurm
test-slurm: install
	SLURM_TEST_DIR=$(SLURM_TEST_DIR) tests/workflow/slurm/cluster.sh start
	SLURM_CONF=$(SLURM_TEST_DIR)/slurm.conf FINEGRAINED_SLURM_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/workflow/test_slurm.py

# The workflow catalog's checks: rule files as snakefmt leaves them, and Snakemake's linter.
SNAKEFMT ?= snakefmt==2.1.0
lint: install
	$(PIP) install -q "$(SNAKEFMT)"
	$(VENV)/bin/snakefmt --check Snakefile workflow
	$(SNAKEMAKE) --lint --configfile config/demo.yaml
	$(SNAKEMAKE) --lint

dry-run: install
	$(SNAKEMAKE) all -n --configfile config/demo.yaml --cores $(CORES)

report: install
	$(SNAKEMAKE) --configfile config/demo.yaml --report results/demo/report.html

# Benchmarks (issue #10; most need the real annotation files in ../shared and skip without
# them): each script writes benchmarks/results/<name>.json, then render.py regenerates
# docs/benchmarks.md from every result. A few minutes each on 2 cores.
BENCHMARKS := crop_throughput input_pipeline augment_cpu linear_probe train_step end_to_end \
	mobilenet_cpu vit_cpu inat_zero_shot_cub50 compile_cache communication
bench: install
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done
	$(PY) benchmarks/render.py

# Real photos with real pretrained weights (needs ../shared): the runs behind
# docs/results-cub50.md, then its table. Each command is a no-op once its run is complete.
# At 224 px only the linear probe (the 10-crop evaluation of one regime takes ~6-15 min on
# 2 cores); the regimes that train the backbone run at 112 px (cub50-112px.yaml).
CUB50 := --configfile config/examples/cub50.yaml
CUB50_112 := $(CUB50) config/examples/cub50-112px.yaml
CUB50_RECIPES := $(CUB50_112) config/examples/cub50-112px-recipes.yaml
IMAGENET := 'backbone={weights: ../shared/weights/mobilenet_v2_1.0_224_imagenet.npz}'
cub50: install
	$(SNAKEMAKE) results/cub50_inat/eval/linear_probe/metrics.json $(CUB50) --cores $(CORES)
	$(SNAKEMAKE) results/cub50_imagenet/eval/linear_probe/metrics.json $(CUB50) --cores $(CORES) \
	    --config run_name=cub50_imagenet $(IMAGENET)
	$(SNAKEMAKE) all $(CUB50_112) config/examples/cub50-112px-sweep.yaml --cores $(CORES)
	$(SNAKEMAKE) all $(CUB50_112) config/examples/cub50-112px-imagenet.yaml --cores $(CORES)
	$(SNAKEMAKE) all $(CUB50) config/examples/cub50-112px-sgd-probe.yaml --cores $(CORES)
	$(SNAKEMAKE) all $(CUB50) config/examples/cub50-112px-sgd-probe.yaml \
	    config/examples/cub50-112px-sgd-probe-augmented.yaml --cores $(CORES)
	$(SNAKEMAKE) all $(CUB50_RECIPES) --cores $(CORES)
	$(SNAKEMAKE) all $(CUB50_RECIPES) --cores $(CORES) --config run_name=cub50_inat_112px_l2sp \
	    'regimes=[full_finetune]' 'seeds=null' 'regime_settings={full_finetune: {regularizer: l2_sp}}'
	$(SNAKEMAKE) all $(CUB50_RECIPES) --cores $(CORES) --config run_name=cub50_inat_112px_refit \
	    'seeds=null' 'protocol={refit: true}'
	$(SNAKEMAKE) all $(CUB50_RECIPES) --cores $(CORES) --config run_name=cub50_inat_112px_l2sp_refit \
	    'regimes=[full_finetune]' 'seeds=null' 'regime_settings={full_finetune: {regularizer: l2_sp}}' \
	    'protocol={refit: true}'
	$(SNAKEMAKE) all $(CUB50_RECIPES) config/examples/cub50-112px-imagenet.yaml --cores $(CORES) \
	    --config run_name=cub50_imagenet_112px_seeds 'seeds=[0, 1, 2]' 'regimes=[full_finetune]'
	$(PY) benchmarks/cub50_head_fit.py
	$(PY) scripts/results_table.py --update docs/results-cub50.md --levels leaf \
	    --run "iNat birds, 224 px=results/cub50_inat" --run "ImageNet, 224 px=results/cub50_imagenet" \
	    --run "iNat birds, 112 px=results/cub50_inat_112px" --run "ImageNet, 112 px=results/cub50_imagenet_112px" \
	    --run "iNat birds, 112 px, SGD probe=results/cub50_inat_112px_sgd_probe" \
	    --run "iNat birds, 112 px, SGD probe, augmented=results/cub50_inat_112px_sgd_probe_aug"
	$(PY) scripts/results_table.py --update docs/results-cub50.md --marker recipes-table --levels leaf \
	    --run "iNat birds, 112 px, LP-FT seeds=results/cub50_inat_112px_lpft" \
	    --run "iNat birds, 112 px, L2-SP=results/cub50_inat_112px_l2sp" \
	    --run "iNat birds, 112 px, refit on train+val=results/cub50_inat_112px_refit" \
	    --run "iNat birds, 112 px, L2-SP, refit on train+val=results/cub50_inat_112px_l2sp_refit" \
	    --run "ImageNet, 112 px, seeds=results/cub50_imagenet_112px_seeds" \
	    --replicates "iNat birds, 112 px=results/cub50_inat_112px_lpft" \
	    --replicates "ImageNet, 112 px=results/cub50_imagenet_112px_seeds"

# The ViT rows of docs/results-cub50.md (issue #27): DINOv2 ViT-S/14 and ViT-B/16 (ImageNet-21k)
# from the Hugging Face Hub, downloaded once on first use (the development machines have no
# network: not run there). The linear probe of each at 224 px, then the table; `snakemake all`
# with the same config files runs the five regimes (on a GPU: docs/results-cub50.md).
CUB50_VITS := dinov2:cub50_dinov2_vits14 vit-b16:cub50_vit_b16_in21k
cub50-vit: install
	@for pair in $(CUB50_VITS); do overlay=$${pair%%:*}; run=$${pair##*:}; \
	    $(SNAKEMAKE) results/$$run/eval/linear_probe/metrics.json $(CUB50) \
	        config/examples/cub50-$$overlay.yaml --cores $(CORES) || exit 1; done
	$(PY) scripts/results_table.py --update docs/results-cub50.md --marker vit-table --levels leaf \
	    --run "DINOv2 ViT-S/14, 224 px=results/cub50_dinov2_vits14" \
	    --run "ViT-B/16 ImageNet-21k, 224 px=results/cub50_vit_b16_in21k"

clean-demo:
	rm -rf results/demo

# The GPU device check (benchmarks/device_check.py, issue #16): `make device-bundle` puts what
# it needs beyond the source tree into .device/ (the MobileNetV2 weights of ../shared; wheels
# for Python 3.12, at the lock's versions, of the library's dependencies beyond the GPU
# machine's JAX+CUDA, flax, optax, orbax, pyarrow and pillow: the check unpacks those the
# machine lacks); on the GPU machine, from the repository root:
#   python benchmarks/device_check.py --bundle .device --out device_check.json
# then copy the JSON to benchmarks/results/ and run benchmarks/render.py.
DEVICE_BUNDLE ?= .device
DEVICE_WHEELS := filelock jsonschema pyyaml safetensors tqdm
device-bundle: install
	rm -rf $(DEVICE_BUNDLE) && mkdir -p $(DEVICE_BUNDLE)/weights $(DEVICE_BUNDLE)/wheels
	cp ../shared/weights/*.npz ../shared/weights/*.json ../shared/weights/bird.bmp \
	    $(DEVICE_BUNDLE)/weights/
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(DEVICE_BUNDLE)/wheels \
	    -c envs/requirements.lock $(DEVICE_WHEELS)

device-check: install
	$(PY) benchmarks/device_check.py --bundle $(DEVICE_BUNDLE) \
	    --out benchmarks/results/device_check.json
	$(PY) benchmarks/render.py
