# mailflow-relay container image.
#
#   docker build -t mailflow-relay .
#   docker run -d --name relay -p 2525:25 -v relay-spool:/var/spool/relay mailflow-relay
#
# Any Debian-like image with python3 (>= 3.11) and the venv module works as the
# base: CI builds from a debootstrap'ed Debian bookworm image instead of
# python:3.12-slim (see .ci/docker-test.sh and docs/docker.md).
ARG BASE_IMAGE=python:3.12-slim

# ---- build stage: the venv, with the port-25 capability on its interpreter ----
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# setcap comes from libcap2-bin (python:3.12-slim lacks it); it stays in this
# stage only.
RUN set -eux; \
    if ! command -v setcap >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libcap2-bin; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# --copies: the venv's interpreter is a real file, not a symlink to the base
# image's python, so the file capability below sticks to the venv alone.
RUN python3 -m venv --copies /opt/relay

# The fast extra (uvloop) is what the README's benchmark figures were measured with.
COPY pyproject.toml README.md /src/
COPY relay /src/relay
RUN set -eux; \
    /opt/relay/bin/pip install '/src[fast]'; \
    /opt/relay/bin/relay --help >/dev/null; \
    for py in /opt/relay/bin/python*; do \
        if [ -f "$py" ] && [ ! -L "$py" ]; then setcap cap_net_bind_service=+ep "$py"; fi; \
    done; \
    getcap /opt/relay/bin/python*

# ---- final stage: base image + venv + config; no compilers, no build tools ----
FROM ${BASE_IMAGE}

RUN set -eux; \
    groupadd --system --gid 1000 relay; \
    useradd --system --uid 1000 --gid relay --home-dir /var/spool/relay \
        --no-create-home --shell /usr/sbin/nologin relay; \
    mkdir -p /var/spool/relay /etc/relay; \
    chown relay:relay /var/spool/relay

# COPY --from keeps the security.capability xattr set in the build stage.
COPY --from=build /opt/relay /opt/relay
COPY docker/config.toml /etc/relay/config.toml

ENV PATH=/opt/relay/bin:$PATH \
    RELAY_CONFIG=/etc/relay/config.toml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

VOLUME ["/var/spool/relay"]
WORKDIR /var/spool/relay
USER relay:relay
EXPOSE 25

# `relay health` exits 0 when the SMTP port answers 220 and the store opens.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["relay", "health"]

# Exec form: relay is PID 1 and gets docker stop's SIGTERM itself; it stops
# cleanly with exit 0 on SIGTERM or SIGINT.
STOPSIGNAL SIGTERM
CMD ["relay", "serve"]
