# Every target here is also what the Dockerfile and CI run: keep them in step.
SHELL := /bin/bash
ORT_VERSION := 1.31.1
ORT_DIR := third_party/onnxruntime
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
PYTHON ?= python3
VENV := .venv
VENV_TRAIN := .venv-train
export ORT_DYLIB_PATH ?= $(abspath $(ORT_LIB))

.PHONY: run test bench train ort venv venv-train lint fmt clean

## ONNX Runtime shared library, taken out of the PyPI wheel (the ort crate's own download cannot reach its host).
ort: $(ORT_LIB)
$(ORT_LIB):
	mkdir -p $(ORT_DIR)/wheel
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
		--python-version 3.11 -d $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	cd $(ORT_DIR) && $(PYTHON) -m zipfile -e wheel/onnxruntime-$(ORT_VERSION)-*.whl wheel/x
	cp $(ORT_DIR)/wheel/x/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	rm -rf $(ORT_DIR)/wheel

## Light Python environment for checking exported models (onnx + onnxruntime, no PyTorch).
venv: $(VENV)/.done
$(VENV)/.done: models/requirements-check.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r models/requirements-check.txt
	touch $@
