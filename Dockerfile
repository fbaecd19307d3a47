# syntax=docker/dockerfile:1
# Arbiter's container image (docs/deployment.md). Two stages: the builder turns the project and its
# dependencies into wheels (it has the compilers, should a dependency lack a wheel for this platform);
# the final stage installs only those wheels on a slim Python, with no compiler and no pip cache.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The Alembic migrations ship inside the wheel (pyproject.toml package-data), so `arbiter migrate`
# works from the installed package with no source tree.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="arbiter" \
      org.opencontainers.image.description="A governance proxy for the Model Context Protocol" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric UID/GID so Kubernetes can check runAsNonRoot without resolving a user name.
RUN groupadd --system --gid 10001 arbiter \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/arbiter --shell /usr/sbin/nologin arbiter \
    && mkdir -p /var/lib/arbiter/audit-spool \
    && chown -R 10001:10001 /var/lib/arbiter
# Only wheels built above, from no index: the final stage compiles nothing and downloads nothing.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/arbiter-*.whl
# Container defaults (`arbiter serve` logs JSON already): listen on every interface; write nothing
# outside /var/lib/arbiter and /tmp, so the root filesystem can be read-only (mount volumes on both).
# The SQLite default is for trying the image out; production sets ARBITER_DATABASE_URL to PostgreSQL.
# These are environment variables, which win over a config file (ARBITER_CONFIG_FILE).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ARBITER_HOST=0.0.0.0 \
    ARBITER_PORT=8080 \
    ARBITER_DATABASE_URL=sqlite+aiosqlite:////var/lib/arbiter/arbiter.db \
    ARBITER_AUDIT__SPOOL_DIR=/var/lib/arbiter/audit-spool
WORKDIR /var/lib/arbiter
VOLUME ["/var/lib/arbiter"]
USER 10001:10001
EXPOSE 8080
# /healthz says the process answers (readiness, /readyz, is the orchestrator's business); no curl in
# the image, so Python's own urllib asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ARBITER_PORT', '8080')}/healthz\", timeout=4)"]
ENTRYPOINT ["arbiter"]
CMD ["serve"]
