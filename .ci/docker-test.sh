#!/usr/bin/env bash
# The Docker image's end-to-end test (issue 5), without Docker Hub.
#
#   bash .ci/docker-test.sh
#
# 1. Installs docker.io, debootstrap and swaks when missing, and starts a private
#    dockerd (own data root, exec root, pidfile and socket under $WORK) that is
#    stopped by PID on exit. The daemon runs with --iptables=false
#    --ip-forward=false --ip-masq=false, so it leaves the host's firewall and
#    forwarding alone: published ports still work through docker-proxy, and the
#    image build uses the host's network (docker build --network host).
# 2. Builds a Debian bookworm rootfs (debootstrap --variant=minbase, from the
#    Debian mirror this machine's apt is configured with) and `docker import`s it
#    as the base image; the tarball is cached under $WORK between runs.
# 3. Derives from it a CI-only base that carries this machine's pip index and
#    CA bundle (never in the real Dockerfile).
# 4. Builds the real Dockerfile with --build-arg BASE_IMAGE=<that base>, then
#    checks: 220 banner on a published loopback port, swaks gets 250 2.6.0,
#    `relay queue list --all --json` in the container shows the message, the health
#    status becomes healthy, non-root, `docker stop` takes < 5 s with exit 0,
#    and a new container on the same volume still lists the message.
#
# Prints PASS/FAIL lines and exits non-zero on any failure. Every wait is bounded.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${RELAY_CI_DOCKER_DIR:-/var/tmp/relay-ci-docker}
SOCK=$WORK/docker.sock
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
IMAGE=mailflow-relay:ci
RUN_ID=relay-ci-$$
VOLUME=$RUN_ID-spool
C1=$RUN_ID-1
C2=$RUN_ID-2
STOP_LIMIT=5

export DOCKER_HOST=unix://$SOCK
export DOCKER_BUILDKIT=0          # the classic builder: no buildx plugin, no frontend image to pull
export DOCKER_CLI_HINTS=false
export DEBIAN_FRONTEND=noninteractive

FAILURES=0
PASSES=0
DOCKERD_PID=
CHILD=
CREATED_BRIDGE=0

log() { printf '[docker-test] %s\n' "$*"; }
# docker run warns that forwarding is off (on purpose: see above); hide only that.
docker_run() { timeout 60 docker run "$@" 2> >(grep -v "IPv4 forwarding is disabled" >&2); }
pass() { printf 'PASS: %s\n' "$*"; PASSES=$((PASSES + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; FAILURES=$((FAILURES + 1)); }
die() { fail "$*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- clean-up --
stop_dockerd() {
    [ -n "$DOCKERD_PID" ] || return 0
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 60); do
            # a zombie still answers kill -0: look at its state instead
            case "$(ps -o stat= -p "$DOCKERD_PID" 2>/dev/null)" in
                ''|Z*) break ;;
            esac
            sleep 0.5
        done
        if ps -o stat= -p "$DOCKERD_PID" 2>/dev/null | grep -qv '^Z'; then
            log "dockerd did not stop in 30 s: SIGKILL"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
    fi
    wait "$DOCKERD_PID" 2>/dev/null
    DOCKERD_PID=
    # dockerd leaves its exec-root/netns/default nsfs mount behind: drop it and
    # anything else still mounted under $WORK.
    findmnt -rn -o TARGET 2>/dev/null | grep "^$WORK/" | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
    if [ "$CREATED_BRIDGE" = 1 ] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0 2>/dev/null
    fi
}

# Long steps run in the background and are waited for, so that a signal to
# this script is acted on at once (bash defers traps while a foreground
# command runs); cleanup ends such a step by its PID.
long() {
    "$@" &
    CHILD=$!
    wait "$CHILD"
    local rc=$?
    CHILD=
    return "$rc"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    if [ -n "$DOCKERD_PID" ]; then
        timeout 30 docker rm -f "$C1" "$C2" >/dev/null 2>&1
        timeout 30 docker volume rm -f "$VOLUME" >/dev/null 2>&1
        timeout 60 docker image prune -f >/dev/null 2>&1
        stop_dockerd
    fi
    rm -rf "$WORK/ci-base-ctx"
    [ "$rc" -ne 0 ] && [ "$FAILURES" -eq 0 ] && FAILURES=1   # interrupted
    printf 'docker-test: %d passed, %d failed\n' "$PASSES" "$FAILURES"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers --
apt_install_missing() {
    # $@: "command:package" pairs
    local want=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || want+=("${pair#*:}")
    done
    [ ${#want[@]} -eq 0 ] && return 0
    log "installing ${want[*]}"
    timeout 600 apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null &&
        timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${want[@]}" >/dev/null
}

# The machine's configured Debian mirror for $SUITE (deb822 .sources first,
# then one-line .list files).
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { u = ""; s = ""
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { v = $i; sub(/^URIs:[ \t]*/, "", v); split(v, a, /[ \t]+/); u = a[1] }
                  if ($i ~ /^Suites:/) { s = $i " " }
              }
              if (u != "" && s ~ ("[ \t]" suite "[ \t]")) { print u; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" {
                i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return 0; }
    done
    return 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Reads the first reply line on host:port within 3 s.
banner() {
    timeout 5 python3 - "$1" "$2" <<'EOF' 2>/dev/null
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
    s.settimeout(3)
    data = b""
    while b"\n" not in data:
        chunk = s.recv(512)
        if not chunk:
            break
        data += chunk
    print(data.decode("utf-8", "replace").strip())
EOF
}

# Does `relay queue list --all --json` output (stdin) hold message $1 (or, without an
# id, any message to alice@contoso.test)? Prints the matching status summary.
queue_has() {
    python3 -c '
import json, sys
want = sys.argv[1]
doc = json.load(sys.stdin)
msgs = doc.get("messages", doc) if isinstance(doc, dict) else doc
for m in msgs:
    rcpts = [r.get("address") if isinstance(r, dict) else r for r in m.get("recipients", [])]
    if (want and str(m.get("id")) == want) or (not want and "alice@contoso.test" in rcpts):
        st = ",".join(str(r.get("address")) + "=" + str(r.get("status"))
                      for r in m.get("recipients", []) if isinstance(r, dict))
        print("id=" + str(m.get("id")) + " " + st)
        sys.exit(0)
sys.exit(1)
' "$1"
}

health_of() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1" 2>/dev/null; }

show_logs() {
    log "--- docker logs $1 (last 40 lines) ---"
    timeout 20 docker logs --tail 40 "$1" 2>&1 | sed 's/^/    /'
}

# ------------------------------------------------------- 1. docker daemon --
mkdir -p "$WORK"
T_ALL=$(now)

apt_install_missing dockerd:docker.io debootstrap:debootstrap swaks:swaks ||
    die "apt-get install of docker.io/debootstrap/swaks failed"
for tool in dockerd docker debootstrap swaks python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done

# A dockerd left by an earlier, killed run of this script (our own pidfile only).
if [ -s "$WORK/dockerd.pid" ]; then
    old=$(cat "$WORK/dockerd.pid")
    if [ -n "$old" ] && [ "$(ps -o comm= -p "$old" 2>/dev/null)" = dockerd ]; then
        log "stopping the dockerd of an earlier run (pid $old)"
        kill -TERM "$old" 2>/dev/null
        for _ in $(seq 1 40); do
            case "$(ps -o stat= -p "$old" 2>/dev/null)" in ''|Z*) break ;; esac
            sleep 0.5
        done
    fi
    rm -f "$WORK/dockerd.pid"
fi
rm -f "$SOCK"
ip link show docker0 >/dev/null 2>&1 || CREATED_BRIDGE=1

log "starting dockerd (socket $SOCK)"
dockerd \
    --data-root "$WORK/data" \
    --exec-root "$WORK/exec" \
    --pidfile "$WORK/dockerd.pid" \
    -H "unix://$SOCK" \
    --iptables=false --ip-forward=false --ip-masq=false \
    >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!

ready=0
for _ in $(seq 1 60); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    if timeout 5 docker version >/dev/null 2>&1; then ready=1; break; fi
    sleep 1
done
if [ "$ready" != 1 ]; then
    tail -n 30 "$WORK/dockerd.log" | sed 's/^/    /'
    die "dockerd did not come up within 60 s (log: $WORK/dockerd.log)"
fi
pass "dockerd $(docker version --format '{{.Server.Version}}') up, storage driver $(docker info --format '{{.Driver}}')"

# ------------------------------------------ 2. debootstrap base image --------
T_BASE=$(now)
key=$(printf '%s %s' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
TARBALL=$WORK/$SUITE-rootfs-$key.tar.gz
if [ ! -s "$TARBALL" ]; then
    MIRROR=$(debian_mirror) || die "no Debian $SUITE mirror found in /etc/apt/sources.list{,.d}"
    log "debootstrap $SUITE from $MIRROR (--include=$BASE_PACKAGES)"
    # leftovers of an interrupted debootstrap: unmount first, never cross mounts
    findmnt -rn -o TARGET 2>/dev/null | grep "^$WORK/rootfs\." | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf --one-file-system "$WORK"/rootfs.* "$WORK"/*.tar.gz.tmp
    ROOTFS=$(mktemp -d "$WORK/rootfs.XXXXXX")
    if ! long timeout 1200 debootstrap --variant=minbase --include="$BASE_PACKAGES" \
            "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        tail -n 20 "$WORK/debootstrap.log" | sed 's/^/    /'
        rm -rf --one-file-system "$ROOTFS"
        die "debootstrap failed (log: $WORK/debootstrap.log)"
    fi
    rm -rf --one-file-system "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$ROOTFS" -czf "$TARBALL.tmp" . ||
        { rm -rf --one-file-system "$ROOTFS" "$TARBALL.tmp"; die "could not pack the rootfs"; }
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf --one-file-system "$ROOTFS"
    find "$WORK" -maxdepth 1 -name "$SUITE-rootfs-*.tar.gz" ! -name "$(basename "$TARBALL")" -delete
else
    log "using cached rootfs $TARBALL"
fi
tarsum=$(sha256sum "$TARBALL" | cut -c1-12)
BASE=relay-ci-base:$SUITE-$tarsum
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    timeout 300 docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$TARBALL" "$BASE" >/dev/null || die "docker import of $TARBALL failed"
fi
pass "base image $BASE ($(docker run --rm --network none "$BASE" python3 --version 2>&1))"

# ----------------------- 3. CI-only derived base: this machine's pip setup --
CTX=$WORK/ci-base-ctx
rm -rf "$CTX"; mkdir -p "$CTX"
# The CA bundle pip uses here (the egress path may re-sign TLS).
ca=${PIP_CERT:-}
[ -n "$ca" ] || ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -n "$ca" ] && [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
cp "$ca" "$CTX/ca-bundle.crt" || die "no CA bundle at $ca"
# Index settings from pip's own configuration and environment; local file://
# indexes and find-links directories are not visible inside the build.
python3 - "$CTX/pip.conf" <<'EOF' || die "could not write the CI pip.conf"
import os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                     capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():
    if "=" not in line:
        continue
    key, value = line.split("=", 1)
    name = key.split(".", 1)[-1]
    conf[name] = value.strip().strip("'\"")
for env, name in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                  ("PIP_TRUSTED_HOST", "trusted-host")):
    if os.environ.get(env):
        conf[name] = os.environ[env]
lines = ["[global]", "cert = /etc/ssl/certs/relay-ci-ca-bundle.crt", "timeout = 180"]
for name in ("index-url", "extra-index-url", "trusted-host"):
    vals = [v for v in conf.get(name, "").split() if not v.startswith("file:")]
    if vals:
        lines.append(f"{name} = {' '.join(vals)}")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
cat >"$CTX/Dockerfile" <<EOF
FROM $BASE
COPY ca-bundle.crt /etc/ssl/certs/relay-ci-ca-bundle.crt
COPY pip.conf /etc/pip.conf
ENV PIP_CERT=/etc/ssl/certs/relay-ci-ca-bundle.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/relay-ci-ca-bundle.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/relay-ci-ca-bundle.crt
EOF
CI_BASE=relay-ci-pipbase:$SUITE-$tarsum
timeout 300 docker build -q --network host -t "$CI_BASE" "$CTX" >"$WORK/ci-base-build.log" 2>&1 ||
    die "could not build the CI base $CI_BASE"
pass "CI base $CI_BASE (pip.conf: $(grep -c . "$CTX/pip.conf") lines, CA bundle from $ca) in $(elapsed "$T_BASE" "$(now)") s"

# ------------------------------------------------------ 4. the real image --
T_BUILD=$(now)
log "docker build --build-arg BASE_IMAGE=$CI_BASE -t $IMAGE $ROOT"
if ! long timeout 1200 docker build --network host --build-arg BASE_IMAGE="$CI_BASE" \
        -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" | sed 's/^/    /'
    die "docker build failed (log: $WORK/build.log)"
fi
BUILD_S=$(elapsed "$T_BUILD" "$(now)")
pass "image $IMAGE built in $BUILD_S s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# ------------------------------------------------------ 5. run and check ----
T_TEST=$(now)
PORT=$(free_port)
docker volume create "$VOLUME" >/dev/null || die "docker volume create failed"
# ip_unprivileged_port_start=1024 turns off Docker's own port-25 allowance, so
# this also proves the venv interpreter's cap_net_bind_service does the job.
if ! docker_run -d --name "$C1" \
        -p "127.0.0.1:$PORT:25" \
        -v "$VOLUME:/var/spool/relay" \
        --sysctl net.ipv4.ip_unprivileged_port_start=1024 \
        --health-interval 2s --health-timeout 5s --health-start-period 2s --health-retries 3 \
        "$IMAGE" >/dev/null; then
    die "docker run of $IMAGE failed"
fi

got=
for _ in $(seq 1 60); do
    [ "$(docker inspect -f '{{.State.Running}}' "$C1" 2>/dev/null)" = true ] || break
    got=$(banner 127.0.0.1 "$PORT")
    case "$got" in 220*) break ;; esac
    sleep 1
done
case "$got" in
    220*) pass "banner on 127.0.0.1:$PORT -> container port 25: $got" ;;
    *) show_logs "$C1"; die "no 220 banner on 127.0.0.1:$PORT within 60 s (got: '${got}')" ;;
esac

uid=$(timeout 30 docker exec "$C1" id -u 2>/dev/null)
if [ -n "$uid" ] && [ "$uid" != 0 ]; then
    pass "the relay runs as a non-root user (uid $uid, user $(docker exec "$C1" id -un 2>/dev/null))"
    start=$(timeout 30 docker exec "$C1" cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null)
    if [ "$start" = 1024 ]; then
        pass "port 25 bound as uid $uid with ip_unprivileged_port_start=1024: the venv python's cap_net_bind_service works"
    else
        fail "ip_unprivileged_port_start in the container is '${start}' (want 1024: the capability check is void)"
    fi
else
    fail "the relay runs as uid '${uid}' (want non-root)"
fi

if loop=$(timeout 30 docker exec "$C1" python -c 'import uvloop; print(uvloop.__version__)' 2>&1); then
    pass "the image has the fast extra (uvloop $loop), which relay serve runs on"
else
    fail "uvloop is missing from the image (want pip install '/src[fast]'): $loop"
fi

SWAKS_OUT=$WORK/swaks.out
timeout 60 swaks --to alice@contoso.test --from bob@fabrikam.test --server "127.0.0.1:$PORT" \
    --header "Subject: docker-test $RUN_ID" --timeout 30 >"$SWAKS_OUT" 2>&1
line=$(grep -m1 -E '^ *<- +250 2\.6\.0' "$SWAKS_OUT")
if [ -n "$line" ]; then
    pass "swaks: ${line#"${line%%[! ]*}"}"
else
    sed 's/^/    /' "$SWAKS_OUT" | tail -n 25
    show_logs "$C1"
    die "swaks did not get 250 2.6.0"
fi
QID=$(printf '%s\n' "$line" | sed -n 's/.*\[InternalId=\([^]]*\)\].*/\1/p')

if out=$(timeout 30 docker exec "$C1" relay queue list --all --json 2>&1) &&
        found=$(printf '%s' "$out" | queue_has "$QID"); then
    pass "docker exec $C1 relay queue list --all --json shows the message ($found)"
else
    printf '%s\n' "$out" | head -n 20 | sed 's/^/    /'
    fail "relay queue list --all --json in the container does not show message '${QID}'"
fi

status=
for _ in $(seq 1 45); do
    status=$(health_of "$C1")
    [ "$status" = healthy ] && break
    sleep 1
done
if [ "$status" = healthy ]; then
    pass "health status healthy (HEALTHCHECK: relay health)"
else
    docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}}: {{.Output}}{{end}}' "$C1" 2>/dev/null |
        tail -n 10 | sed 's/^/    /'
    fail "health status is '${status}' after 45 s (want healthy)"
fi

t0=$(now)
timeout 30 docker stop -t 10 "$C1" >/dev/null
STOP_S=$(elapsed "$t0" "$(now)")
code=$(docker inspect -f '{{.State.ExitCode}}' "$C1" 2>/dev/null)
if awk -v s="$STOP_S" -v l="$STOP_LIMIT" 'BEGIN { exit !(s < l) }'; then
    pass "docker stop took $STOP_S s (< $STOP_LIMIT s)"
else
    fail "docker stop took $STOP_S s (limit $STOP_LIMIT s): SIGTERM as PID 1 is not handled"
fi
if [ "$code" = 0 ]; then
    pass "the relay exited 0 on SIGTERM"
else
    show_logs "$C1"
    fail "the relay exited $code on SIGTERM (want 0)"
fi

# A new container on the same volume still has the message.
docker_run -d --name "$C2" -v "$VOLUME:/var/spool/relay" "$IMAGE" >/dev/null ||
    die "docker run of the second container failed"
found=
for _ in $(seq 1 30); do
    if out=$(timeout 30 docker exec "$C2" relay queue list --all --json 2>&1) &&
            found=$(printf '%s' "$out" | queue_has "$QID"); then
        break
    fi
    found=
    sleep 1
done
if [ -n "$found" ]; then
    pass "a new container on volume $VOLUME still lists the message ($found)"
else
    printf '%s\n' "$out" | head -n 20 | sed 's/^/    /'
    show_logs "$C2"
    fail "the second container does not list message '${QID}'"
fi
timeout 30 docker stop -t 10 "$C2" >/dev/null
TEST_S=$(elapsed "$T_TEST" "$(now)")

log "timings: base $(elapsed "$T_BASE" "$T_BUILD") s, image build $BUILD_S s, test $TEST_S s, docker stop $STOP_S s, total $(elapsed "$T_ALL" "$(now)") s"
if [ "$FAILURES" -eq 0 ]; then
    log "all docker checks passed"
    exit 0
fi
log "$FAILURES docker check(s) failed"
exit 1
