# syntax=docker/dockerfile:1
# SpaceNet-Stream: the `spacenet serve` service (and the other `spacenet` commands).
#
#   docker build -t spacenet-stream .                          # CUDA variant (default)
#   docker build -t spacenet-stream:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -e SPACENET_BOOTSTRAP=kafka:9092 -v spacenet-state:/var/lib/spacenet spacenet-stream
#   make image [VARIANT=cuda]      # podman, on a Debian base made locally: no registry at all
#
# Configured only through SPACENET_* and SPACENET_KAFKA_* environment variables (see
# docs/deployment.md). The dependencies are installed by scripts/install-deps.sh from
# requirements.lock, the very script and lock that `make test` and `make demo` use.
#
# Base image: both variants run on the official Python 3.11 image (the Python the lock is
# resolved and tested on). The pinned torch build (2.14.1+cu130) brings the whole CUDA 13.0
# user space as locked wheels (nvidia-cuda-runtime 13.0.96, cuBLAS, cuDNN 9, NCCL...), so a
# CUDA base image would only duplicate several GB of libraries at versions the lock does not
# control, and their Ubuntu 24.04 has Python 3.12, not the tested 3.11. The one thing the
# host provides is the driver, which the NVIDIA Container Toolkit mounts in: the cuda variant
# sets the variables it reads, as NVIDIA's own images do. `make image` (scripts/image.sh) passes
# PYTHON_IMAGE=localhost/spacenet-base:bookworm instead: Debian bookworm with its own Python 3.11
# (3.11.2), made from Debian's mirror, for machines that reach no container registry.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG VARIANT=cuda

# --------------------------------------------------------------------- requirements
# The dependencies pyproject.toml declares, alone in a file: other edits of pyproject.toml
# (tool settings, test markers) then leave the dependency layer below cached.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml scripts/prune-venv.py ./
RUN python3 prune-venv.py --list pyproject.toml > requirements.in

# ----------------------------------------------------------------------------- deps
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=python3.11
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock, the declared dependencies or
# these scripts change. Then the development tools the lock also pins (pytest, ruff, mypy,
# hadolint...) and the packages' own test suites are removed: the image keeps the run-time
# closure of the project's dependencies, at the locked versions.
COPY requirements.lock ./
COPY --from=requirements /src/requirements.in ./
COPY scripts/install-deps.sh scripts/prune-venv.py scripts/
RUN scripts/install-deps.sh /opt/venv \
    && /opt/venv/bin/python scripts/prune-venv.py requirements.in

# ---------------------------------------------------------------------------- build
# The project alone, without dependencies (everything it needs is pinned above), staged under
# /stage so that the image takes it as a small layer of its own: a code change rebuilds that
# layer, not the 7 GB one of the dependencies.
FROM deps AS build
COPY pyproject.toml README.md ./
COPY strategy/ strategy/
COPY stream/ stream/
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation --root /stage /src \
    && PYTHONPATH="/stage$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
       /stage/opt/venv/bin/spacenet --help >/dev/null

# -------------------------------------------------------------------------- runtime
# On the deps stage itself: its venv layer is the image's, never copied (a copy of 7 GB
# costs minutes at each build, and the build cache has to hash it again at each rebuild).
FROM deps AS runtime

# A fixed, non-root uid/gid (10001) so volumes and Kubernetes securityContexts can name it.
# Its state lives in /var/lib/spacenet (the volume); datasets for `spacenet produce` in /data.
RUN groupadd --system --gid 10001 spacenet \
    && useradd --system --uid 10001 --gid spacenet --home-dir /tmp/spacenet --no-create-home \
       --shell /usr/sbin/nologin spacenet \
    && install -d -o spacenet -g spacenet -m 0750 /var/lib/spacenet /data

COPY --from=build /stage/ /

# Everything written outside the volume goes under /tmp, so the root filesystem can be
# read-only with a tmpfs on /tmp: importing avalanche creates ~/.avalanche, matplotlib
# wants a config dir, torch and tempfile use TMPDIR. (Spill files go to the state dir.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/spacenet \
    MPLCONFIGDIR=/tmp/spacenet/matplotlib \
    XDG_CACHE_HOME=/tmp/spacenet/cache \
    TMPDIR=/tmp \
    SPACENET_STATE_DIR=/var/lib/spacenet \
    SPACENET_METRICS_HOST=0.0.0.0 \
    SPACENET_METRICS_PORT=9109 \
    SPACENET_DATA=/data

# Labels last, so that a new revision does not rebuild the layers above.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="spacenet-stream" \
      org.opencontainers.image.description="SpaceNet continual learning as a Kafka-fed streaming service (spacenet serve)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

USER 10001:10001
WORKDIR /var/lib/spacenet
VOLUME ["/var/lib/spacenet"]
EXPOSE 9109
# serve stops cleanly on SIGTERM: an interrupted training is abandoned and replays on restart.
STOPSIGNAL SIGTERM
# /healthz answers 200 while the service loop is alive (no curl in the image: Python's urllib,
# bypassing any proxy settings). Commands other than serve have no endpoint: disable it for them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('SPACENET_METRICS_PORT', '9109'), timeout=4)"]
ENTRYPOINT ["spacenet"]
CMD ["serve"]

# ------------------------------------------------------------------------- variants
# cpu: never looks for a GPU.
FROM runtime AS cpu
LABEL org.opencontainers.image.variant="cpu"
ENV SPACENET_DEVICE=cpu

# cuda: SPACENET_DEVICE stays "auto" (the GPU when the container has one, else the CPU with
# a warning). The NVIDIA Container Toolkit reads these: which GPUs, which driver libraries,
# and the driver the pinned CUDA 13.0 needs (R580 or newer), checked before the container starts.
FROM runtime AS cuda
LABEL org.opencontainers.image.variant="cuda13.0"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# The image that `docker build` produces: --build-arg VARIANT=cpu|cuda (or --target).
FROM ${VARIANT}
