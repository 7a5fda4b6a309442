# dicom_ai: the two commands a new user needs are `make demo` and `make test`.
#
# The virtual environment is created on first use. torch is installed only when the
# environment cannot import one already, so on a GPU host either pre-install a CUDA
# torch into $(VENV) or run `make test VENV_ARGS=--system-site-packages` to reuse the
# system's; TORCH_SPEC picks the release (this machine has the CPU build of 2.13.0 on disk).

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEBS := dcmtk dicom3tools pixelmed-apps orthanc orthanc-dicomweb openssl systemd postgresql redis-server logrotate
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: all test demo debs venv bench viewer-check status-page-check clean fuzz fuzz-distributed crash-storm crash-storm-distributed bench-scaleout

all: test

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Debian packages of the real peers and validators the tests run against.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

test: venv debs
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv debs
	$(PY) -m dicom_ai.cli.demo --out demo-out

bench: venv debs
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# OHIF (npm @ohif/app) over Orthanc DICOMweb in headless Debian Chromium: are the node's
# SEG and SR findings visible on the mammogram? Installs chromium, nodejs/npm and the npm
# packages (into build/viewer) when missing; screenshots and report.json in build/viewer/out.
VIEWER_DEBS := chromium chromium-driver orthanc-dicomweb
viewer-check: venv debs
	@missing=""; for p in $(VIEWER_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PY) conformance/viewer/check_viewer.py --out build/viewer/out

# Issue 17's status page screenshot in headless Debian Chromium (installed when missing; a
# large package, so `make test` skips this part of tests/test_metrics_http.py).
status-page-check: venv debs
	@dpkg -s chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	mkdir -p build/status-page
	DICOM_AI_STATUS_SCREENSHOT=1 DICOM_AI_STATUS_SCREENSHOT_OUT=$(CURDIR)/build/status-page/status.png \
	  $(PY) -m pytest -q tests/test_metrics_http.py -k metrics_move

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# The shipped discriminative U-Net bundle (models/dunet 0.3.0; needs mini-MIAS at MIAS_DIR):
# Genesis pretraining without labels on every mini-MIAS image and generated phantoms at 0.4,
# 0.8 and 1.6 mm, the five fold bundles at 0.8 mm and their held-out evaluation (Platt
# calibration per held-out fold, exported with --export), the all-folds bundle with the pooled
# calibration, then the node's operating points. About an hour on two busy CPU cores.
DUNET_RUNS ?= build/runs
DUNET_SEG ?= --pixel-size 0.8 --patch 128 --epochs 4 --steps-per-epoch 150 --batch-size 8 --lesion-rate 0.5
dunet-bundle: venv
	nice $(PY) -m dicom_ai train dunet --stage pretrain --dataset mias=$(MIAS_DIR) --dataset phantom --phantom-seeds 0:6 --pixel-size 0.4 0.8 1.6 --epochs 6 --steps-per-epoch 200 --run-dir $(DUNET_RUNS)/pretrain --resume --out $(DUNET_RUNS)/pretrain.safetensors
	nice $(PY) benchmarks/bench_dunet_resolution.py --root $(MIAS_DIR) --runs $(DUNET_RUNS) --init $(DUNET_RUNS)/pretrain.safetensors --spacings 0.8 --epochs 4 --steps 150 --export $(DUNET_RUNS)/dunet-0.8-folds
	nice $(PY) -m dicom_ai train dunet --stage segment --dataset mias=$(MIAS_DIR) --folds 0,1,2,3,4 $(DUNET_SEG) --seed 0 --init $(DUNET_RUNS)/pretrain.safetensors --run-dir $(DUNET_RUNS)/all-folds --resume --calibration $(DUNET_RUNS)/dunet-0.8-folds/calibration.json --metrics $(DUNET_RUNS)/dunet-0.8-folds/metrics.json --version 0.3.0 --out models/dunet
	nice $(PY) benchmarks/bench_mias_node.py --root $(MIAS_DIR) --dunet-folds $(DUNET_RUNS)/dunet-0.8-folds --write-manifests

# Issue 13's fuzz target: 1,200 mutated C-STOREs against a real node (tests/fuzz_node.py);
# report in benchmarks/results/fuzz.json. `make test` runs a 96-case sample (tests/test_fuzz.py).
FUZZ_CASES ?= 1200
fuzz: venv debs
	cd tests && $(abspath $(PY)) fuzz_node.py --cases $(FUZZ_CASES) --out $(CURDIR)/benchmarks/results/fuzz.json

# Issue 24: the same cases against the distributed node (PostgreSQL, Redis, two dicom-ai workers).
fuzz-distributed: venv debs
	cd tests && $(abspath $(PY)) fuzz_node.py --distributed --cases $(FUZZ_CASES) --out $(CURDIR)/benchmarks/results/fuzz_distributed.json

# Issue 13's crash storm: >= 25 SIGKILLs of node and worker while studies flow (Orthanc PACS
# counting every receipt); report in benchmarks/results/crash_storm.json.
crash-storm: venv debs
	$(PY) benchmarks/bench_crash_storm.py

# Issue 24: the same storm against the distributed node (PostgreSQL, Redis, two dicom-ai
# workers; also kills pool processes, restarts PostgreSQL and Redis);
# benchmarks/results/crash_storm_distributed.json.
crash-storm-distributed: venv debs
	$(PY) benchmarks/bench_crash_storm.py --distributed

# The shipped GLAM bundle (models/glam): Models-Genesis pretraining of both networks, GLAM from
# image-level phantom labels, the CAM baseline on the same data, five-fold mini-MIAS fine-tuning
# and its all-folds bundle (0.2.0), then from it the hybrid curriculum (conspicuous inserted
# masses, then realistic ones, plus the real folds) per fold and on all folds: 0.3.0 (needs
# mini-MIAS at MIAS_DIR, see the README).
MIAS_DIR ?= /work/data/mias
GLAM_ARGS ?= --train-studies 1200 --val-studies 50 --workers 2 --no-progress
GLAM_TRAIN ?= --lr 1e-3 --balance sqrt --schedule cosine --warmup-steps 50 --epochs-global 12 --seed 0 --threads 1
glam-bundle: venv
	nice $(PY) -m dicom_ai train glam-pretrain --epochs-global 1 --epochs-local 1 --workers 2 --no-progress --out build/glam/pretrain.safetensors
	nice $(PY) -m dicom_ai train glam $(GLAM_ARGS) --init build/glam/pretrain.safetensors $(GLAM_TRAIN) --epochs-local 2 --epochs-joint 1 --out build/glam-phantom
	nice $(PY) -m dicom_ai train glam $(GLAM_ARGS) --baseline cam --init build/glam/pretrain.safetensors $(GLAM_TRAIN) --out build/glam-cam
	nice $(PY) benchmarks/bench_glam_mias.py --mias $(MIAS_DIR) --bundle build/glam-phantom --cam build/glam-cam/cam.safetensors --ship models/glam
	nice $(PY) benchmarks/bench_glam_hybrid.py --mias $(MIAS_DIR) --bundles build/glam-hybrid --train --train-all --recipe curriculum --folds 0 1 2 3 4 --out benchmarks/results/glam_hybrid_curriculum_folds01234.json
	$(PY) benchmarks/bench_glam_hybrid.py --ship build/glam-hybrid/all-stage1 build/glam-hybrid/all
	nice $(PY) benchmarks/bench_mias_node.py --root $(MIAS_DIR) --dunet-folds $(DUNET_RUNS)/dunet-0.8-folds --glam-folds build/glam-hybrid --write-manifests
	nice $(PY) benchmarks/bench_glam.py --bundle build/glam-phantom --cam build/glam-cam/cam.safetensors --skip-overlays --skip-speed
	nice $(PY) benchmarks/bench_glam.py --bundle models/glam --skip-quality

# Issue 19's scale-out benchmark: study throughput with 1, 2 and 4 Celery workers on a
# PostgreSQL job store and a Redis broker (all started on loopback), against the embedded
# node; report in benchmarks/results/scaleout.json.
bench-scaleout: venv debs
	nice -n 5 $(PY) benchmarks/bench_scaleout.py
