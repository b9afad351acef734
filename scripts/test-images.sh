#!/usr/bin/env bash
# CI's image stage (.ci/run calls it after scripts/test-all.sh), on a fresh Debian machine:
# podman and its configuration, both images built from this checkout on locally made base
# images (no Docker Hub here), then the tests that run them (tests/python/test_image_run.py,
# test_chart_pod.py). Prints the time of each part.
#   SDKUBE_BUILD_CA=FILE  the CA bundle the builds trust for crates.io/PyPI (default: this
#                         machine's, which includes a TLS-inspecting proxy's CA if it has one)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
scripts/setup-podman.sh
scripts/install-test-deps.sh
echo "test-images.sh: setup $((SECONDS - start)) s" >&2
# The CUDA build and its saved archive need about 12 GiB on a fresh machine (podman's store and
# /var/tmp). Each earlier build left its untagged builder stage (about 4 GiB, mostly layers
# shared with the others): on a machine short of space they go first, at the price of
# downloading the builder's CUDA wheels again.
free_gib() { df --output=avail -BG /var/tmp | tail -1 | tr -dc 0-9; }
if [ "$(free_gib)" -lt 20 ]; then
  podman image prune -f >/dev/null
fi
echo "test-images.sh: $(free_gib) GiB free for the builds" >&2
[ "$(free_gib)" -ge 12 ] || echo "test-images.sh: warning: under 12 GiB free; the CUDA image may not fit" >&2
ca=${SDKUBE_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
build=$SECONDS
scripts/build-images.sh --local-bases --host-tests ${ca:+--ca "$ca"}
echo "test-images.sh: base images and both builds $((SECONDS - build)) s" >&2
tests=$SECONDS
SDKUBE_IMAGE_TESTS=1 python3 -m pytest -q -rA tests/python/test_image_run.py tests/python/test_chart_pod.py
echo "test-images.sh: image tests $((SECONDS - tests)) s; total $((SECONDS - start)) s" >&2
