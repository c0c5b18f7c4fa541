#!/usr/bin/env bash
# Local stand-ins for the base images that Dockerfile names, for a machine that
# has podman/buildah and Debian's package mirror but cannot pull from a
# container registry (deploy/README.md, "Verified here"). Not needed where
# `docker build` / `podman build` can pull images.
#
#   debian:bookworm-slim        debootstrap --variant=minbase bookworm, imported
#   python:3.12-slim-bookworm   that + Debian's python3/pip (3.11; only
#                               `python3 -m pip download` is used)
#   rust:1.95-bookworm          that + gcc/libc6-dev/pkg-config/libssl-dev and
#                               this machine's Rust toolchain (rustc --print
#                               sysroot) copied to /usr/local/rust, cargo and
#                               rustc on PATH as in the official image
#
# Each is tagged both short and as docker.io/library/NAME:TAG, so
# `podman build --pull=never` resolves the Dockerfile's FROM lines to them.
#
# Usage: deploy/local-base-images.sh [--force]
#   WORK_DIR     where the rootfs and the build contexts go
#                (default /var/tmp/softprompt-base-images; not in the repo)
#   DEBIAN_MIRROR  default http://deb.debian.org/debian
#   EXTRA_CA_DIR   *.crt files added to the trust store of the python and
#                rust stand-ins only (default /usr/local/share/ca-certificates:
#                a machine whose HTTPS egress goes through an intercepting
#                proxy needs its CA there for pip and cargo to download);
#                the debian stand-in, hence the runtime image, stays without.
# Needs root (debootstrap), debootstrap, podman. Idempotent: an existing
# rootfs tarball or image is reused unless --force.
set -euo pipefail

force=0
[[ "${1:-}" == "--force" ]] && force=1

WORK_DIR="${WORK_DIR:-/var/tmp/softprompt-base-images}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
RUST_TAG="1.95-bookworm"
PY_TAG="3.12-slim-bookworm"

for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install -y $tool)" >&2; exit 1; }
done
[[ "$(id -u)" == 0 ]] || { echo "error: debootstrap needs root" >&2; exit 1; }
mkdir -p "$WORK_DIR"

have_image() { [[ $force == 0 ]] && podman image exists "$1"; }

tag_both() { # IMAGE_ID NAME:TAG
    podman tag "$1" "$2" "docker.io/library/$2"
}

# --- debian:bookworm-slim ---------------------------------------------------
if have_image docker.io/library/debian:bookworm-slim; then
    echo "debian:bookworm-slim: present"
else
    tarball="$WORK_DIR/bookworm-minbase.tar"
    if [[ $force == 1 || ! -f "$tarball" ]]; then
        rootfs="$WORK_DIR/rootfs"
        rm -rf "$rootfs"
        echo "debootstrap bookworm (minbase) from $DEBIAN_MIRROR ..."
        debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
        # Like the official slim image: no package lists or downloaded debs,
        # and apt keeps no binary caches or .debs after a run (else every
        # `apt-get install` layer carries ~90 MB of /var/cache/apt/*.bin).
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
               "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
        cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
        cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
DPKG
        find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
        rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    id="$(podman import --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball")"
    tag_both "$id" debian:bookworm-slim
    echo "debian:bookworm-slim: imported ($id)"
fi

# Build context with the extra CA certificates (may be empty).
ctx_ca="$WORK_DIR/ctx-ca"
rm -rf "$ctx_ca"; mkdir -p "$ctx_ca/ca"
if compgen -G "$EXTRA_CA_DIR/*.crt" >/dev/null; then
    cp "$EXTRA_CA_DIR"/*.crt "$ctx_ca/ca/"
fi

# --- python:3.12-slim-bookworm ----------------------------------------------
if have_image "docker.io/library/python:$PY_TAG"; then
    echo "python:$PY_TAG: present"
else
    cat > "$ctx_ca/Containerfile.python" <<'CF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
CMD ["python3"]
CF
    podman build --pull=never --network=host -f "$ctx_ca/Containerfile.python" \
        -t "python:$PY_TAG" -t "docker.io/library/python:$PY_TAG" "$ctx_ca"
fi

# --- rust:1.95-bookworm -----------------------------------------------------
if have_image "docker.io/library/rust:$RUST_TAG"; then
    echo "rust:$RUST_TAG: present"
else
    sysroot="$(rustc --print sysroot)"
    version="$(rustc --version)"
    case "$version" in
        "rustc 1.95."*) ;;
        *) echo "warning: host toolchain is '$version', the stand-in is tagged rust:$RUST_TAG" >&2 ;;
    esac
    ctx_rust="$WORK_DIR/ctx-rust"
    rm -rf "$ctx_rust"; mkdir -p "$ctx_rust/rust"
    cp -a "$ctx_ca/ca" "$ctx_rust/ca"
    echo "copying the toolchain from $sysroot (without docs) ..."
    tar -C "$sysroot" --exclude=./share/doc --exclude=./share/man -cf - . | tar -C "$ctx_rust/rust" -xf -
    cat > "$ctx_rust/Containerfile.rust" <<'CF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        gcc g++ libc6-dev make pkg-config libssl-dev ca-certificates git \
 && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rust/ /usr/local/rust/
RUN mkdir -p /usr/local/cargo/bin && for b in /usr/local/rust/bin/*; do ln -s "$b" /usr/local/cargo/bin/; done
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["bash"]
CF
    podman build --pull=never --network=host -f "$ctx_rust/Containerfile.rust" \
        -t "rust:$RUST_TAG" -t "docker.io/library/rust:$RUST_TAG" "$ctx_rust"
    rm -rf "$ctx_rust"
fi
rm -rf "$ctx_ca"
podman images --filter reference='*/library/*'
