# Every target here is also what the Dockerfile and CI run: keep them in step.
SHELL := /bin/bash
ORT_VERSION := 1.31.1
ORT_DIR := third_party/onnxruntime
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
PYTHON ?= python3
VENV := .venv
VENV_TRAIN := .venv-train
export ORT_DYLIB_PATH ?= $(abspath $(ORT_LIB))

.PHONY: run test bench train ort venv venv-train lint fmt prometheus-tools

## ONNX Runtime shared library, taken out of the PyPI wheel (the ort crate's own download cannot reach its host).
ort: $(ORT_LIB)
$(ORT_LIB):
	mkdir -p $(ORT_DIR)/wheel
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
		--python-version 3.11 -d $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	cd $(ORT_DIR) && $(PYTHON) -m zipfile -e wheel/onnxruntime-$(ORT_VERSION)-*.whl wheel/x
	cp $(ORT_DIR)/wheel/x/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	rm -rf $(ORT_DIR)/wheel

## Light Python environment for checking exported models and deploy files (no PyTorch).
CHECK_REQUIREMENTS := models/requirements-check.txt tests/ops/requirements.txt
venv: $(VENV)/.done
$(VENV)/.done: $(CHECK_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(addprefix -r ,$(CHECK_REQUIREMENTS))
	touch $@

## Prometheus and promtool from Debian's package, for the real-Prometheus check.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }

## Serve on 127.0.0.1:8080 with models/mobiface.onnx and data/gallery.db.
run: ort
	cargo run --release --locked -- serve

## Everything CI runs: model graph checks, Dockerfile checks, all Rust tests
## (real model, real SQLite, real HTTP), and the real-Prometheus proof. `cargo test`
## also builds target/debug/mobiface, with the tests' feature set, for that proof
## (a separate `cargo build` would compile the dependencies a second time).
test: ort venv prometheus-tools
	$(VENV)/bin/python models/test_model.py
	$(VENV)/bin/python tests/ops/check_dockerfile.py
	cargo test --locked
	$(VENV)/bin/python tests/ops/prometheus_check.py --bin target/debug/mobiface

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

fmt:
	cargo fmt

## --- models ---
## Training environment: PyTorch, the dlib teacher, ONNX export.
venv-train: $(VENV_TRAIN)/.done
$(VENV_TRAIN)/.done: models/requirements-train.txt
	$(PYTHON) -m venv $(VENV_TRAIN)
	$(VENV_TRAIN)/bin/pip install --quiet -r models/requirements-train.txt
	$(VENV_TRAIN)/bin/pip install --quiet --no-deps face_recognition==1.3.0
	touch $@

## Retrain MobiFace (teacher embeddings, Flipped-MobiFace distillation, then a fine-tune whose
## averaged weights (SWA) are exported; CUDA when present). TRAIN_MINUTES and FINETUNE_MINUTES
## are wall-clock budgets; `make train TRAIN_ARGS=--resume` continues the first run.
TRAIN_MINUTES ?= 120
FINETUNE_MINUTES ?= 60
MODEL_VERSION ?= 1.3.0
train: venv-train venv
	$(VENV_TRAIN)/bin/python models/teacher.py --sets lfw,lfw-mirror
	$(VENV_TRAIN)/bin/python models/train.py --budget-minutes $(TRAIN_MINUTES) $(TRAIN_ARGS)
	$(VENV_TRAIN)/bin/python models/train.py --init models/checkpoints/best.pt --out models/checkpoints/ft \
		--budget-minutes $(FINETUNE_MINUTES) --batch 32 --lr 5e-4 --swa-start 0.2 --val-every-min 5
	$(VENV_TRAIN)/bin/python models/export.py --checkpoint models/checkpoints/ft/swa.pt --version $(MODEL_VERSION) --output models/mobiface.onnx
	$(VENV)/bin/python models/calibrate.py --model models/mobiface.onnx --write

## Benchmarks (not tests; numbers vary by machine): engine throughput and latency
## across worker layouts and batch caps, then 1:N search next to FAISS IndexFlatIP.
bench: ort
	cargo run --release --locked --example bench_embed -- $(or $(BENCH_SECONDS),4)
	bash benches/gallery_search.sh
