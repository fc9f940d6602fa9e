# distill with both backends (torchvision and detectron2) on a CUDA runtime image: the library and CLI, the
# service's API and its Celery workers (docker-compose.yml runs them; docs/several-machines.md).
#
#   docker build -t distill .
#   docker run --gpus all distill demo                   # writes /app/runs/demo inside the container
#   docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/runs:/app/runs" distill demo   # ... into ./runs
#
# It runs as the unprivileged user `distill` (uid 10001), which owns /var/lib/distill (the service's data:
# storage, beat's schedule, the GPU locks; the volumes docker-compose.yml mounts there start with that owner)
# and /app. A bind mount must be writable by the user the container runs as (hence --user above).
#
# detectron2 is not on PyPI: it is built from its official git source at a pinned commit, in a separate
# stage with the CUDA compiler, and only the wheel reaches the runtime image. To move the pin, pass
#   --build-arg DETECTRON2_COMMIT=<sha>
# and run the detectron2 backend's tests (tests/models/test_detectron2_backend.py) against the new build.
# TORCH_CUDA_ARCH_LIST selects the GPU generations the CUDA kernels are compiled for (A100 8.0, A10/3090 8.6,
# L4/4090 8.9, H100 9.0); CUDA_VERSION must match the CUDA build of the torch wheel.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=22.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS detectron2
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv git build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# detectron2's model_zoo imports pkg_resources, which setuptools >= 81 no longer ships
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" "setuptools<81" wheel
RUN git clone https://github.com/facebookresearch/detectron2.git /src/detectron2 \
    && git -C /src/detectron2 checkout "${DETECTRON2_COMMIT}"
ENV FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN pip wheel --no-build-isolation --no-deps --wheel-dir /wheels /src/detectron2

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION}
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" "setuptools<81"
COPY --from=detectron2 /wheels /wheels
# detectron2's own dependencies (fvcore, iopath, pycocotools, ...) come from the index
RUN pip install --no-cache-dir /wheels/detectron2-*.whl && rm -rf /wheels
RUN groupadd --system --gid 10001 distill \
    && useradd --system --uid 10001 --gid distill --create-home --home-dir /home/distill --shell /usr/sbin/nologin distill \
    && mkdir -p /app /var/lib/distill/storage /var/lib/distill/beat /var/lib/distill/gpu-locks \
    && chown -R distill:distill /app /var/lib/distill
WORKDIR /app
COPY pyproject.toml README.md ./
COPY distill ./distill
COPY service ./service
COPY workers ./workers
# the whole project: the `distill` command (with `distill up`, `distill token`, `distill remote`), uvicorn and
# celery for the service's processes, psycopg for PostgreSQL. s3fs is not included: add it for s3:// storage.
RUN pip install --no-cache-dir .
ENV DISTILL_DATA_DIR=/var/lib/distill
USER distill
EXPOSE 8000
# `docker run distill demo` runs `distill demo`; docker-compose.yml sets each service's own entrypoint
# (uvicorn service.api.main:app, celery -A workers.app worker / beat).
ENTRYPOINT ["distill"]
CMD ["--help"]
