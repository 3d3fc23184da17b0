# Sourced by build.sh and tests/test_image.py's commands (`. deploy/image/podman-env.sh`): a
# podman of the image's own, with its storage in CALIPER_IMAGE_CACHE (default .cache/image in
# the clone), apart from any other podman on the machine, and a configuration that works where
# these machines showed crun failing ("cgroups in hybrid mode", setrlimit).
CALIPER_IMAGE_CACHE=${CALIPER_IMAGE_CACHE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cache/image}
mkdir -p "$CALIPER_IMAGE_CACHE"
CALIPER_IMAGE_CACHE=$(cd "$CALIPER_IMAGE_CACHE" && pwd)
# Per-boot state on /run (a tmpfs on most machines, so a reboot clears it as podman expects),
# named after the cache so that two clones' podmans never share it.
# Not root (rootless podman; not tried on these machines): the user's runtime directory.
_caliper_run_base=/run
[ "$(id -u)" = 0 ] || _caliper_run_base=${XDG_RUNTIME_DIR:-/tmp}
_caliper_run=$_caliper_run_base/caliper-sidecar-podman/$(printf %s "$CALIPER_IMAGE_CACHE" | sha256sum | cut -c1-12)
# Explicit limits: podman's defaults (nofile 1048576, nproc 4194304) are above what these
# machines let a process raise them to (no CAP_SYS_RESOURCE), and runc then fails ("error
# setting rlimit"). nofile: the shell's own; nproc: 4096, plenty for one Python service (the
# shell's hard limit was refused there too). Only this podman's containers get these: the
# image carries no limits, and a school's podman or docker applies its own.
_caliper_limit() { case $1 in unlimited) echo -1 ;; *) echo "$1" ;; esac; }
cat > "$CALIPER_IMAGE_CACHE/containers.conf" <<CONF
[containers]
default_ulimits = [
  "nofile=$(_caliper_limit "$(ulimit -Sn)"):$(_caliper_limit "$(ulimit -Hn)")",
  "nproc=4096:4096",
]

[engine]
# runc: crun fails on these machines' hybrid cgroups; cgroupfs: no systemd to ask.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$_caliper_run/events.log"
tmp_dir = "$_caliper_run/libpod"
CONF
cat > "$CALIPER_IMAGE_CACHE/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$CALIPER_IMAGE_CACHE/storage"
runroot = "$_caliper_run/storage"
CONF
export CALIPER_IMAGE_CACHE
export CALIPER_IMAGE_RUN=$_caliper_run  # for whoever throws this podman away
export CONTAINERS_CONF="$CALIPER_IMAGE_CACHE/containers.conf"
export CONTAINERS_STORAGE_CONF="$CALIPER_IMAGE_CACHE/storage.conf"
unset _caliper_run _caliper_run_base
unset -f _caliper_limit
