# streamscore server image.
#   docker build -t streamscore .
#   docker run -p 50051:50051 -p 9464:9464 -v "$PWD/models:/models:ro" streamscore
# Settings: /etc/streamscore/streamscore.yaml (mount your own over it), STREAMSCORE_* env
# vars, or `--set key.path=value` after `serve`. See server/settings.py.

# ---- builder: install the package and its dependencies into a venv ------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

# A C compiler for the one extension of our own (server/explain/_lookup.c, the
# reasons' TreeSHAP lookup); every dependency ships manylinux wheels. The builder only:
# the runtime stage copies the venv. Versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY server/ server/
COPY feature_streams/ feature_streams/
COPY protos/ protos/
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -c "import server.explain._lookup" \
    && /opt/venv/bin/streamscore --help > /dev/null

# ---- runtime: the venv only, no build tools, non-root ---------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMSCORE_SERVER__HOST=0.0.0.0 \
    STREAMSCORE_MODELS__REPOSITORY=/models

RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin streamscore \
    && mkdir /models \
    && chown 10001:10001 /models

COPY --from=builder /opt/venv /opt/venv
COPY config/streamscore.yaml /etc/streamscore/streamscore.yaml
COPY features.yaml /etc/streamscore/features.yaml

# Relative paths in the config (features.definitions_path) resolve beside it.
WORKDIR /etc/streamscore
USER 10001:10001

VOLUME ["/models"]
EXPOSE 50051 9464

# gRPC health check (grpc.health.v1) on the serving port; exit 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;p=os.environ.get('STREAMSCORE_SERVER__PORT','50051');r=g.HealthStub(grpc.insecure_channel('127.0.0.1:'+p)).Check(h.HealthCheckRequest(),timeout=3);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]

ENTRYPOINT ["streamscore"]
CMD ["serve", "--config", "/etc/streamscore/streamscore.yaml"]
