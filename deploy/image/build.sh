#!/usr/bin/env bash
# Builds caliper-sidecar's image from nothing, with no container registry: a Debian bookworm
# root file system made by mmdebstrap (Python 3.11, like the project's), imported as the base;
# the project and its pinned dependencies as a wheelhouse built here; `podman build
# --network=none`; then `podman save` into one file a school can carry (`podman load -i`).
# The file is a docker-archive, not an oci-archive: the OCI format has no HEALTHCHECK, and an
# oci-archive loaded back here had lost it.
#
#   deploy/image/build.sh [OUTPUT]     default OUTPUT: build/caliper-sidecar-VERSION.tar
#
# Environment:
#   CALIPER_IMAGE_CACHE  where the base tarball and podman's own storage live (default
#                        .cache/image in the clone): kept between runs, so a second build
#                        reuses the base and the layers; delete it to start from nothing.
#   CALIPER_IMAGE_BASE   a base image already in that storage (e.g. python:3.11-slim pulled
#                        from a registry) instead of the mmdebstrap one.
#   CALIPER_IMAGE_MIRROR a Debian mirror for mmdebstrap (default: mmdebstrap's own).
# As root, installs podman, runc and mmdebstrap with apt-get when they are missing.
# Prints the image's tag and the archive's path; `. deploy/image/podman-env.sh` gives the
# same podman (storage and configuration) to a shell.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=deploy/image

missing=()
for tool in podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ -z "${CALIPER_IMAGE_BASE:-}" ]; then
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build.sh: needs ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
        exit 3
    fi
    echo "installing ${missing[*]}"
    # --no-install-recommends: podman's recommends (buildah, fuse-overlayfs, slirp4netns) are
    # for rootless use; rootful podman with runc needs none of them.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# shellcheck source=podman-env.sh
. "$here/podman-env.sh"

version=$(python3 -c 'import re,sys; print(re.search(r"__version__ = \"(.+?)\"", open("caliper_sidecar/__init__.py").read())[1])')
tag="localhost/caliper-sidecar:$version"
output=${1:-build/caliper-sidecar-$version.tar}
started=$SECONDS

base=${CALIPER_IMAGE_BASE:-localhost/caliper-sidecar-base:bookworm}
if [ -z "${CALIPER_IMAGE_BASE:-}" ] && ! podman image exists "$base"; then
    rootfs="$CALIPER_IMAGE_CACHE/base-bookworm.tar"
    if [ ! -s "$rootfs" ]; then
        # mmdebstrap picks the output's format by its name's ending: .tar, or a directory.
        part="$CALIPER_IMAGE_CACHE/base-bookworm.part.tar"
        rm -rf "$part"
        echo "making the base root file system (mmdebstrap, about 20 s)"
        # essential + what the Containerfile uses. The customize hook empties apt's sources
        # (mmdebstrap already drops the lists): no mirror of this machine is baked into the
        # image, and nothing inside it is meant to apt-get.
        mmdebstrap --quiet --variant=essential \
            --include=python3,python3-venv,ca-certificates,passwd \
            --customize-hook='rm -f "$1"/etc/apt/sources.list.d/*; : > "$1"/etc/apt/sources.list' \
            bookworm "$part" ${CALIPER_IMAGE_MIRROR:+"$CALIPER_IMAGE_MIRROR"}
        mv "$part" "$rootfs"
    fi
    podman import --quiet "$rootfs" "$base" >/dev/null
fi

echo "building the wheelhouse (deploy/constraints.txt, the postgres extra included)"
# Wheels for the interpreter inside the image: Debian bookworm's python3 and python:3.11-slim
# are both 3.11, so the host's must be too, or the compiled wheels would not install there.
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "build.sh: the wheelhouse needs Python 3.11 on the host, this is %d.%d" % sys.version_info[:2])'
rm -rf build/wheels
mkdir -p build
python3 -m pip wheel --quiet --disable-pip-version-check -c deploy/constraints.txt \
    '.[postgres]' -w build/wheels > build/wheels.log 2>&1 || { cat build/wheels.log >&2; exit 1; }
cp deploy/constraints.txt build/wheels/constraints.txt

echo "building $tag on $base"
# --format docker: the OCI image format has no HEALTHCHECK and buildah would drop it.
podman build --quiet --network=none --format docker --build-arg "BASE=$base" \
    -f deploy/Containerfile -t "$tag" . > build/image.log 2>&1 || { cat build/image.log >&2; exit 1; }

# The previous build's image, now untagged: gone, or the cache would grow with every build.
podman image prune --force >/dev/null

mkdir -p "$(dirname "$output")"
rm -f "$output"
podman save --quiet --format docker-archive -o "$output" "$tag"
echo "built $tag in $((SECONDS - started)) s; saved to $output ($(du -h "$output" | cut -f1))"
