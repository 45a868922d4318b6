# lstm-serve: a small non-root serving image (the default, last target) and a training image (--target train).
#   docker build -t lstm-serve .                   # serving: no torch, no compilers, the shipped model inside
#   docker build -t lstm-serve:train --target train .
# Every setting is an LSTM_SERVE_* environment variable (see README "Deploy").

ARG PYTHON_IMAGE=python:3.11-slim

# --- dependencies: one cached layer, rebuilt only when pyproject.toml changes ---------------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt

# --- the project itself, on top of the dependencies ----------------------------------------------
FROM deps AS build
COPY README.md ./
COPY service ./service
COPY model ./model
RUN /opt/venv/bin/pip install --no-deps . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/pip /opt/venv/bin/pip*

# --- training image: the CPU build of torch; retrains into a mounted model directory -------------
#   docker run --rm -v "$PWD/models:/app/models" lstm-serve:train
FROM deps AS train
# NOTE: where the CPU build of torch comes from; a local wheel folder works too:
#   --build-arg TORCH_PIP_ARGS="--find-links http://127.0.0.1:8765/"  (python -m http.server in that folder)
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
RUN /opt/venv/bin/pip install ${TORCH_PIP_ARGS} "torch==2.13.0" \
 && /opt/venv/bin/pip install "onnx>=1.16" "vega-datasets==0.9.0" "matplotlib>=3.8" "tqdm>=4.66"
COPY README.md ./
COPY service ./service
COPY model ./model
RUN /opt/venv/bin/pip install --no-deps .
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
ENTRYPOINT ["lstm-serve", "train"]
CMD ["--name", "seattle-weather", "--version", "1", "--models", "/app/models"]

# --- serving image -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
RUN groupadd --system --gid 10001 lstm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lstm
COPY --from=build /opt/venv /opt/venv
COPY models /app/models
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_MODELS=/app/models \
    LSTM_SERVE_HTTP_PORT=8000 \
    LSTM_SERVE_GRPC_PORT=50051
USER 10001:10001
EXPOSE 8000 50051
# NOTE: the real readiness endpoint, probed with Python (no curl in the image)
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 CMD ["python", "-m", "service.probe"]
STOPSIGNAL SIGTERM
# NOTE: the server is PID 1 and handles SIGTERM itself: readiness false, drain, exit 0
ENTRYPOINT ["lstm-serve", "serve"]
