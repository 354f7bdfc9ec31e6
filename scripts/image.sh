#!/usr/bin/env bash
# Build the service's image with podman, reaching no container registry at any step.
#
#   scripts/image.sh [cpu|cuda]          # `make image` (cpu), `make image VARIANT=cuda`
#
# 1. podman, buildah, runc and mmdebstrap from Debian's packages, when missing.
# 2. The base image $SPACENET_BASE_IMAGE (localhost/spacenet-base:bookworm), when missing:
#    Debian bookworm (minbase, merged /usr without the usrmerge package) with its Python 3.11,
#    venv and CA certificates, made by mmdebstrap from this machine's Debian sources, then
#    `podman import`ed. Remove it (`podman rmi`) to make it afresh.
# 3. `podman build` of the Dockerfile on it, never pulling (--pull=never), in docker format
#    (the OCI format has no HEALTHCHECK), tagged localhost/spacenet-stream:<variant>.
#    Build steps use the host's network, and this machine's CA bundle is mounted over the
#    build container's, only while a step runs (pip goes through an HTTPS proxy that re-signs
#    certificates here); nothing of it stays in the image.
#
# Podman reads deploy/podman/containers.conf (CONTAINERS_CONF): runc, and open-file and process
# limits that a machine without CAP_SYS_RESOURCE can grant. Rootful podman (run as root).
# Prints the build time and the image size; `podman history` shows each layer.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
variant=${1:-cpu}
case "$variant" in
  cpu | cuda) ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac
export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}
base=${SPACENET_BASE_IMAGE:-localhost/spacenet-base:bookworm}
tag=${SPACENET_IMAGE:-localhost/spacenet-stream:$variant}
ca_bundle=/etc/ssl/certs/ca-certificates.crt

"$root/scripts/system-deps.sh" --containers

if ! podman image exists "$base"; then
  # This machine's own Debian sources (mirror and suites, security updates included).
  sources=http://deb.debian.org/debian
  [ -f /etc/apt/sources.list.d/debian.sources ] && sources=/etc/apt/sources.list.d/debian.sources
  echo "image: making the base image $base from $sources" >&2
  start=$SECONDS
  tarball=$(mktemp --suffix=.tar)
  trap 'rm -f "$tarball"' EXIT
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$tarball" "$sources"
  podman import --quiet --change 'CMD ["/usr/bin/python3"]' "$tarball" "$base" >/dev/null
  rm -f "$tarball"
  echo "image: base image $base made in $((SECONDS - start)) s" >&2
fi

mounts=()
[ -f "$ca_bundle" ] && mounts=(--volume "$ca_bundle:$ca_bundle:ro")
echo "image: building $tag (VARIANT=$variant) on $base" >&2
start=$SECONDS
podman build --pull=never --format docker --network host "${mounts[@]}" \
  --build-arg VARIANT="$variant" --build-arg PYTHON_IMAGE="$base" \
  --build-arg REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
  --file "$root/Dockerfile" --tag "$tag" "$root"
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "image: $tag built in $((SECONDS - start)) s; $((size / 1000000)) MB" >&2
