#!/usr/bin/env bash
# Makes the two base images the Dockerfiles' FROM lines name, locally, for machines that cannot
# pull from Docker Hub (CI here reaches package registries only):
#   docker.io/library/debian:trixie-slim      Debian's minbase trixie from the Debian mirror,
#                                             trimmed as the official slim image is
#   docker.io/library/rust:1.95.0-slim-trixie that base + gcc/libc6-dev/ca-certificates (what the
#                                             official rust slim image installs) + this machine's
#                                             rustup toolchain 1.95.0, minimal profile, laid out
#                                             as the official image (/usr/local/{rustup,cargo})
# Debian's own rustc (1.85 in trixie) is too old for the locked dependencies (rust-version 1.89),
# hence the host toolchain. Idempotent: an image already present is kept (FORCE=1 remakes).
# Usage: scripts/make-base-images.sh    (root; podman from scripts/setup-podman.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN=${DEBIAN:-trixie}
RUST_VERSION=${RUST_VERSION:-1.95.0}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SLIM=docker.io/library/debian:$DEBIAN-slim
RUST=docker.io/library/rust:$RUST_VERSION-slim-$DEBIAN
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { [ "${FORCE:-0}" != 1 ] && podman image exists "$1"; }

if ! have "$SLIM"; then
  start=$SECONDS
  # The official slim image's trims: no man pages, docs (copyrights kept), locales or info
  # pages, now or in later apt installs (the dpkg excludes stay in the image); apt keeps no
  # .deb files or package caches in a layer (the docker-clean idea).
  mmdebstrap --variant=minbase --format=tar --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --aptopt='Acquire::Languages "none"' \
    --aptopt='APT::AutoRemove::SuggestsImportant "false"' \
    --customize-hook='cat >"$1/etc/apt/apt.conf.d/docker-clean" <<CONF
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF' \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin "$1"/var/cache/debconf/*-old' \
    --customize-hook='rm -f "$1"/etc/apt/trusted.gpg.d/debian-archive-bullseye-* "$1"/etc/apt/trusted.gpg.d/debian-archive-bookworm-*' \
    "$DEBIAN" "$work/rootfs.tar" \
    "deb $MIRROR $DEBIAN main" "deb $MIRROR $DEBIAN-updates main" "deb $SECURITY $DEBIAN-security main"
  podman import --change 'CMD ["bash"]' --message "mmdebstrap --variant=minbase $DEBIAN" \
    "$work/rootfs.tar" "$SLIM" >/dev/null
  rm -f "$work/rootfs.tar"
  echo "made $SLIM in $((SECONDS - start)) s"
fi

if ! have "$RUST"; then
  start=$SECONDS
  tc=$(rustup toolchain list | awk '{print $1}' | while read -r t; do
    [ "$("$(rustup +"$t" which rustc)" --version | awk '{print $2}')" = "$RUST_VERSION" ] && echo "$t" && break
  done || true)
  [ -n "$tc" ] || { echo "make-base-images.sh: no rustup toolchain $RUST_VERSION on this machine" >&2; exit 2; }
  src=$(rustup +"$tc" which rustc | xargs dirname | xargs dirname)
  name=$RUST_VERSION-x86_64-unknown-linux-gnu
  dst=$work/ctx/usr/local/rustup/toolchains/$name
  mkdir -p "$dst/lib/rustlib" "$work/ctx/usr/local/cargo/bin"
  # rustup's minimal profile is the rustc, cargo and rust-std components: copy the files their
  # install manifests list (no docs, clippy, rustfmt), and the manifests themselves.
  comps=(rustc cargo rust-std)
  for c in "${comps[@]}"; do
    m=lib/rustlib/manifest-$c-x86_64-unknown-linux-gnu
    cp "$src/$m" "$dst/$m"
    (cd "$src" && sed -n 's/^file://p' "$m" | grep -v '^share/doc/' | xargs cp --parents -t "$dst")
  done
  cp "$src/lib/rustlib/rust-installer-version" "$src/lib/rustlib/multirust-channel-manifest.toml" \
    "$dst/lib/rustlib/"
  printf '%s-x86_64-unknown-linux-gnu\n' "${comps[@]}" >"$dst/lib/rustlib/components"
  { echo 'config_version = "1"'
    for c in cargo rust-std rustc; do
      printf '\n[[components]]\npkg = "%s"\ntarget = "x86_64-unknown-linux-gnu"\nis_extension = false\n' "$c"
    done; } >"$dst/lib/rustlib/multirust-config.toml"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n\n[overrides]\n' "$name" \
    >"$work/ctx/usr/local/rustup/settings.toml"
  cp "$(command -v rustup)" "$work/ctx/usr/local/cargo/bin/rustup"
  # the proxies rustup-init installs (hard links there; symbolic here, which an image layer keeps)
  for p in cargo cargo-clippy cargo-fmt cargo-miri clippy-driver rls rust-analyzer rust-gdb \
    rust-gdbgui rust-lldb rustc rustdoc rustfmt; do
    ln -s rustup "$work/ctx/usr/local/cargo/bin/$p"
  done
  chmod -R a+w "$work/ctx/usr/local/rustup" "$work/ctx/usr/local/cargo"  # as the official image
  cat >"$work/Containerfile" <<EOF
FROM $SLIM
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$RUST_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY usr /usr
RUN rustup --version && cargo --version && rustc --version
EOF
  podman build --pull=never --network=host -q -f "$work/Containerfile" -t "$RUST" "$work/ctx" >/dev/null
  echo "made $RUST in $((SECONDS - start)) s (toolchain from $src)"
fi
