#!/usr/bin/env bash
# Publishes what scripts/build-images.sh saved: both OCI archives pushed under several tags,
# and the chart as an OCI artifact whose default image is pinned by digest.
#
#   scripts/publish-images.sh --registry REGISTRY --tag X.Y.Z [--out DIR] [--dry-run DIR]
#
#   images   REGISTRY/sdkube:{X.Y.Z,X.Y,latest}, REGISTRY/sdkube-cpu:{X.Y.Z,X.Y,latest}
#   chart    oci://REGISTRY/charts/sdkube:X.Y.Z, version and appVersion X.Y.Z, image.digest the
#            pushed CUDA image's (a tag can move, a digest cannot)
#   --dry-run DIR  writes to OCI layouts in DIR and the packaged chart to DIR instead of pushing
#            (what the tests here can check: no registry is reachable from CI)
# Needs skopeo and helm, and credentials for the registry (`podman login` / `helm registry login`).
set -euo pipefail
cd "$(dirname "$0")/.."

registry="" tag="" out=out/images dry=""
while [ $# -gt 0 ]; do
  case $1 in
    --registry) registry=$2; shift ;;
    --tag) tag=$2; shift ;;
    --out) out=$2; shift ;;
    --dry-run) dry=$2; shift ;;
    *) echo "publish-images.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$registry" ] && [ -n "$tag" ] || { echo "usage: $0 --registry REGISTRY --tag X.Y.Z [--dry-run DIR]" >&2; exit 2; }
[[ $tag =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "publish-images.sh: tag $tag is not X.Y.Z" >&2; exit 2; }
[ -z "$dry" ] || mkdir -p "$dry"

digest=""
for name in sdkube sdkube-cpu; do
  archive=$out/$name-$tag.oci.tar
  [ -f "$archive" ] || { echo "publish-images.sh: $archive missing: run scripts/build-images.sh --tag $tag" >&2; exit 2; }
  for t in "$tag" "${tag%.*}" latest; do
    if [ -n "$dry" ]; then dest="oci:$dry/$name:$t"; else dest="docker://$registry/$name:$t"; fi
    skopeo copy --quiet --digestfile "$out/$name.digest" "oci-archive:$archive" "$dest"
  done
  [ "$name" = sdkube ] && digest=$(cat "$out/$name.digest")
  echo "publish-images.sh: $registry/$name:$tag@$(cat "$out/$name.digest")" >&2
done

# The chart, its default image pinned to what was just pushed.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r deploy/helm/sdkube "$work/"
sed -i -e "s/^version: .*/version: $tag/" -e "s/^appVersion: .*/appVersion: \"$tag\"/" "$work/sdkube/Chart.yaml"
sed -i -e "s|^  repository: .*|  repository: $registry/sdkube|" -e "s|^  digest: \"\"|  digest: \"$digest\"|" \
  "$work/sdkube/values.yaml"
grep -q "^  digest: \"$digest\"" "$work/sdkube/values.yaml" || { echo "publish-images.sh: could not pin the digest in values.yaml" >&2; exit 1; }
helm package "$work/sdkube" --destination "$work" >/dev/null
if [ -n "$dry" ]; then
  cp "$work/sdkube-$tag.tgz" "$dry/"
else
  helm push "$work/sdkube-$tag.tgz" "oci://$registry/charts"
fi
echo "publish-images.sh: chart sdkube $tag, image $registry/sdkube@$digest" >&2
