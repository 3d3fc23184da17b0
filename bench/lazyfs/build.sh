#!/bin/sh
# Build LazyFS (https://github.com/dsrhaslab/lazyfs), patched, for bench/power_cut.py.
#
#     bench/lazyfs/build.sh SOURCE OUT
#
# SOURCE: LazyFS's source: a checked-out tree (holding lazyfs/ and libs/), or a git directory
# (a clone or the mirror the `fetch` of github:dsrhaslab/lazyfs returns; its HEAD is built).
# OUT: where it is built; the binary is OUT/build/lazyfs/lazyfs (the last line printed).
# Run it again at will: the patched copy is redone only when the source or a patch changed,
# and CMake rebuilds only what changed.
#
# The patches (bench/lazyfs/*.patch, applied in name order):
#   01-system-toml11-spdlog: find_package(toml11, spdlog) (Debian's libtoml11-dev 3.7.1 and
#       libspdlog-dev 1.10.0, the versions upstream pins) instead of FetchContent downloads;
#       lazyfs links libpcache by full path (RPATH) and spdlog::spdlog; no GoogleTest fetch.
#   02-statfs-passthrough: statfs answers with the backing file system's figures (stock
#       LazyFS has no statfs, so FUSE says 0 bytes free and the sidecar refuses events with
#       503 disk_full).
#   03-truncate-uninitialized-result: lfs_truncate returned an uninitialized `res`; when it
#       happened to be -1, a successful ftruncate failed with whatever errno was left (seen:
#       SQLite's ftruncate of its -shm file to 3 bytes got ENOENT, and `run` stopped with
#       "disk I/O error" on about one start in ten).
#
# Tested with LazyFS a47a5baea559020f29902662de77764b0cbd62ce on Debian 12 (cmake 3.25,
# g++ 12, libfuse3 3.14).
set -eu

if [ $# -ne 2 ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
SOURCE=$1
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
PATCHES=$(cd "$(dirname "$0")" && pwd)

missing=""
for pkg in cmake g++ pkg-config libfuse3-dev fuse3 libtoml11-dev libspdlog-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "missing Debian packages; install them with:" >&2
    echo "    apt-get install$missing" >&2
    exit 1
fi

# What the patched copy is made of: the source's commit (or path) and the patches' contents.
if [ -d "$SOURCE/lazyfs" ] && [ -d "$SOURCE/libs/libpcache" ]; then
    origin="tree $(cd "$SOURCE" && pwd)"
elif git --git-dir="$SOURCE" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    origin="git $(git --git-dir="$SOURCE" rev-parse HEAD)"
else
    echo "$SOURCE is neither a bare git directory nor a LazyFS tree (lazyfs/, libs/)" >&2
    exit 1
fi
stamp="$origin $(cat "$PATCHES"/*.patch | sha256sum | cut -d' ' -f1)"

if [ ! -f "$OUT/src/.patched" ] || [ "$(cat "$OUT/src/.patched")" != "$stamp" ]; then
    rm -rf "$OUT/src.new"
    mkdir -p "$OUT/src.new"
    case $origin in
        git*)
            # Only what the build needs: a mirror may lack some large test files' blobs.
            git --git-dir="$SOURCE" archive HEAD lazyfs libs LICENSE README.md \
                | tar -x -C "$OUT/src.new"
            ;;
        tree*)
            cp -a "$SOURCE/lazyfs" "$SOURCE/libs" "$OUT/src.new/"
            ;;
    esac
    for p in "$PATCHES"/*.patch; do
        echo "applying $(basename "$p")"
        patch -d "$OUT/src.new" -p1 --forward --quiet <"$p"
    done
    echo "$stamp" >"$OUT/src.new/.patched"
    # Files that did not change keep their times, so CMake rebuilds only what did.
    mkdir -p "$OUT/src"
    rsync -a --checksum --delete "$OUT/src.new/" "$OUT/src/"
    rm -rf "$OUT/src.new"
fi

cmake -S "$OUT/src/libs/libpcache" -B "$OUT/build/pcache" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$OUT/build/pcache" -j "$(nproc)"
cmake -S "$OUT/src/lazyfs" -B "$OUT/build/lazyfs" -DCMAKE_BUILD_TYPE=Release \
    -DPCACHE_BUILD_DIR="$OUT/build/pcache" -DLAZYFS_BUILD_TESTS=OFF >/dev/null
cmake --build "$OUT/build/lazyfs" -j "$(nproc)"

echo "$OUT/build/lazyfs/lazyfs"
