#!/usr/bin/env bash
# Installs Debian's podman/buildah toolset and configures it for a CI machine without a Docker
# daemon (the image builds and image tests, scripts/test-images.sh). Idempotent: quick when
# everything is in place already. Needs root (apt, /etc/containers).
set -euo pipefail

pkgs=()
for cmd in podman:podman buildah:buildah skopeo:skopeo runc:runc mmdebstrap:mmdebstrap \
  newuidmap:uidmap; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || pkgs+=("${cmd##*:}")
done
# podman's bridge networking (each test container gets its own network namespace)
[ -x /usr/lib/cni/bridge ] || [ -x /usr/lib/podman/netavark ] || pkgs+=(containernetworking-plugins)
if [ ${#pkgs[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" containernetworking-plugins
fi

# crun (podman's default) refuses the hybrid cgroup v1/v2 layout of these machines; without
# systemd as PID 1 the cgroup manager must be cgroupfs; podman's default ulimits ask for more
# open files than the hard limit here, which makes every container fail to start.
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
conf=/etc/containers/containers.conf
want=$(cat <<CONF
# written by sdkube scripts/setup-podman.sh
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  [ -f "$conf" ] && ! grep -q 'sdkube scripts/setup-podman.sh' "$conf" && cp "$conf" "$conf.orig"
  mkdir -p /etc/containers
  printf '%s\n' "$want" >"$conf"
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}' >/dev/null
