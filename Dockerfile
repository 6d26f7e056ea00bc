# memcast: the API image (`memcast serve`, the default command) and, with EXTRAS=train, the
# jobs image (`memcast pretrain`, `memcast make-data`, `memcast evaluate`, `memcast replay`).
#
#   docker build -t memcast .                      # the API: CPU build of PyTorch, no training stack
#   docker build -t memcast-train --build-arg EXTRAS=train .              # + pandas, tqdm, matplotlib
#   docker build -t memcast:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # GPU variant (cu12x index)
#
# The GPU variant is the same image with CUDA-enabled torch wheels (they bring their own CUDA
# libraries); run it with `--gpus all` and MEMCAST_DEVICE=cuda. Everything except torch is
# installed from PyPI at the versions pinned in constraints.txt, the file the tests run against.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# The index torch comes from: https://download.pytorch.org/whl/cpu (default) or a CUDA one
# such as https://download.pytorch.org/whl/cu126 or .../cu128.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Optional dependency groups of pyproject.toml to install besides the core ones (comma-separated):
# empty for the API, "train" for the jobs image.
ARG EXTRAS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first (their own layer, rebuilt only when the pins change).
# constraints.txt pins `torch==X+cpu`; the local label is dropped so that a CUDA index resolves the
# same release (X+cu128), and the torch line is filtered out of the constraints used for the rest.
# torch is installed without its dependencies from the PyTorch index only, so nothing else can
# come from that index; its dependencies are then resolved from PyPI against the constraints.
COPY pyproject.toml constraints.txt docker/requirements.py ./
RUN torch_version="$(sed -n 's/^torch==\([^+[:space:]]*\).*/\1/p' constraints.txt)" \
    && test -n "${torch_version}" \
    && pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${torch_version}" \
    && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && python requirements.py "${EXTRAS}" > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt --constraint /tmp/constraints.txt

# The project itself, as a wheel (no editable install, no source tree in the final image).
COPY README.md ./
COPY memcast ./memcast
COPY models ./models
COPY trainer ./trainer
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/memcast-*.whl \
    && pip check \
    && memcast --version

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="memcast" \
      org.opencontainers.image.description="Online forecasting service that keeps learning from every observation" \
      org.opencontainers.image.licenses="Apache-2.0"

# Settings the container needs regardless of the deployment: listen on all interfaces (the
# container's network namespace is the boundary), checkpoints in the /checkpoints volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MEMCAST_HOST=0.0.0.0 \
    MEMCAST_PORT=8000 \
    MEMCAST_CHECKPOINT_DIR=/checkpoints

# A fixed, non-root uid/gid. /checkpoints is created here, owned by that user, so that a named
# volume mounted on it starts with that ownership and `memcast pretrain` can write into it.
RUN groupadd --system --gid 10001 memcast \
    && useradd --system --uid 10001 --gid memcast --create-home --home-dir /home/memcast \
       --shell /usr/sbin/nologin memcast \
    && mkdir -p /checkpoints /data \
    && chown memcast:memcast /checkpoints

COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/memcast/healthcheck.py

USER 10001:10001
WORKDIR /home/memcast
EXPOSE 8000

# Liveness of the process only (/healthz); readiness (/readyz: checkpoint loaded, Redis
# reachable) is what docker-compose.yml checks. python + urllib because slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/memcast/healthcheck.py", "/healthz"]

ENTRYPOINT ["memcast"]
CMD ["serve"]
