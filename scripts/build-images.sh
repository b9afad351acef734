#!/usr/bin/env bash
# Builds the sdkube images from deploy/docker and saves each as an OCI archive.
#
#   scripts/build-images.sh [--local-bases] [--ca FILE] [--tag T] [--registry R] [--out DIR]
#                           [--context DIR] [--host-tests] [cpu] [cuda]   (both by default)
#
#   --local-bases  make the base images the FROM lines name locally first, from Debian's
#                  mirror and this machine's Rust toolchain (scripts/make-base-images.sh): for
#                  machines that cannot pull from Docker Hub (CI here)
#   --ca FILE      a PEM bundle trusted in addition to the image's CAs while the builder
#                  downloads crates and wheels (a TLS-inspecting proxy's); a build secret, never
#                  in an image layer
#   --tag, --registry  image names REGISTRY/sdkube-cpu:TAG and REGISTRY/sdkube:TAG (default
#                  ghcr.io/sdkube and the chart's appVersion: the references the chart uses)
#   --out DIR      where the archives go: DIR/sdkube-cpu-TAG.oci.tar, DIR/sdkube-TAG.oci.tar
#                  (default out/images; `skopeo copy oci-archive:FILE docker://REGISTRY/NAME:TAG`
#                  pushes one, see README "Install on Kubernetes")
#   --context DIR  the build context (default: this checkout)
#   --host-tests   the CUDA builder also runs sdkube-nn's unit tests against the libraries the
#                  image ships (HOST_TESTS in deploy/docker/Dockerfile; CI)
# CUDA_COMPUTE_CAP (default 80) is passed to the CUDA build. ENGINE=docker builds with docker
# (BuildKit) instead of podman. Prints each build's time; idempotent (layer and cargo caches).
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-podman}
local_bases=0 ca="" registry=ghcr.io/sdkube out=out/images context=. host_tests=0
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/sdkube/Chart.yaml)
kinds=()
while [ $# -gt 0 ]; do
  case $1 in
    --local-bases) local_bases=1 ;;
    --ca) ca=$2; shift ;;
    --tag) tag=$2; shift ;;
    --registry) registry=$2; shift ;;
    --out) out=$2; shift ;;
    --context) context=$2; shift ;;
    --host-tests) host_tests=1 ;;
    cpu|cuda) kinds+=("$1") ;;
    *) echo "build-images.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#kinds[@]} -gt 0 ] || kinds=(cpu cuda)
[ -z "$ca" ] || [ -s "$ca" ] || { echo "build-images.sh: --ca $ca is not a readable file" >&2; exit 2; }

if [ "$local_bases" = 1 ]; then
  scripts/make-base-images.sh
fi
mkdir -p "$out"
for kind in "${kinds[@]}"; do
  case $kind in
    cpu) name=sdkube-cpu file=deploy/docker/Dockerfile.cpu args=() ;;
    cuda) name=sdkube file=deploy/docker/Dockerfile
      args=(--build-arg "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}" --build-arg "HOST_TESTS=$host_tests") ;;
  esac
  [ -z "$ca" ] || args+=(--secret "id=ca,src=$ca")
  # --pull=never with local bases: a missing base is an error here, not a Docker Hub request
  [ "$local_bases" = 1 ] && [ "$ENGINE" = podman ] && args+=(--pull=never)
  ref=$registry/$name:$tag
  start=$SECONDS
  if [ "$ENGINE" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "${args[@]}" -f "$context/$file" -t "$ref" "$context"
  else
    # host networking: the builder reaches the registries exactly as this machine does
    podman build --network=host "${args[@]}" -f "$context/$file" -t "$ref" "$context"
  fi
  built=$((SECONDS - start))
  archive=$out/$name-$tag.oci.tar
  rm -f "$archive"
  if [ "$ENGINE" = docker ]; then
    docker save -o "$archive" "$ref"
  else
    podman save --format oci-archive -o "$archive" "$ref"
  fi
  size=$("$ENGINE" image inspect "$ref" --format '{{.Size}}')
  echo "build-images.sh: $ref built in ${built} s, $((size / 1000000)) MB; saved $archive in $((SECONDS - start - built)) s" >&2
done
