#!/usr/bin/env bash
# Build the mirrorproxy image with whichever engine is here: podman, docker (with a
# running engine) or buildah.
#
#   docker/build.sh [--local-base] [--save FILE] [TAG]
#
#   TAG           image name (default mirrorproxy:VERSION, VERSION from pyproject.toml)
#   --local-base  build the Debian bookworm base with mmdebstrap from this machine's own
#                 apt sources instead of pulling debian:bookworm-slim from Docker Hub.
#                 The base tarball is cached, keyed by the sources and this recipe, in
#                 $MIRRORPROXY_BUILD_CACHE (default /var/cache/mirrorproxy-build as root,
#                 else ~/.cache/mirrorproxy-build): delete it to pick up Debian updates.
#   --save FILE   also write the image as a docker-archive, which both
#                 `ctr -n k8s.io images import FILE` and `podman load -i FILE` accept and
#                 which keeps the HEALTHCHECK (an OCI archive would drop it).
#
# Environment: ENGINE=podman|docker|buildah to choose; MIRRORPROXY_APT_SOURCES=FILE for
# the sources mmdebstrap uses; MIRRORPROXY_CA_BUNDLE=FILE, the CA bundle pip in the
# build trusts (default: the host's /etc/ssl/certs/ca-certificates.crt, passed as a
# build secret, never stored in the image).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}
die() { echo "build.sh: $*" >&2; exit 1; }

local_base=0
save=""
tag=""
while [ $# -gt 0 ]; do
    case "$1" in
        --local-base) local_base=1 ;;
        --save) [ $# -ge 2 ] || usage; save="$2"; shift ;;
        --save=*) save="${1#--save=}" ;;
        -h|--help) usage ;;
        -*) echo "build.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$tag" ] || usage; tag="$1" ;;
    esac
    shift
done

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
tag="${tag:-mirrorproxy:${version:-latest}}"
if [ -n "$save" ]; then
    case "$save" in /*) ;; *) save="$PWD/$save" ;; esac
    [ -d "$(dirname "$save")" ] || die "--save $save: no such directory"
fi

engine="${ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v podman >/dev/null; then engine=podman
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v buildah >/dev/null; then engine=buildah
    else die "no podman, docker engine or buildah found (apt-get install podman)"
    fi
fi
case "$engine" in podman|docker|buildah) ;; *) die "ENGINE=$engine: use podman, docker or buildah" ;; esac

has_image() {
    case "$engine" in
        podman) podman image exists "$1" ;;
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    esac
}

# The base for --local-base: Debian bookworm with python3 (and python3-venv for the
# build stage; the final stage deletes its pip wheels), nothing from Docker Hub.
base_packages="python3,python3-venv,ca-certificates"
base_path="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
build_local_base() {
    command -v mmdebstrap >/dev/null || die "--local-base needs mmdebstrap (apt-get install mmdebstrap)"
    local sources="${MIRRORPROXY_APT_SOURCES:-}"
    if [ -z "$sources" ]; then
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            sources=/etc/apt/sources.list.d/debian.sources
        elif grep -qs '^deb ' /etc/apt/sources.list; then
            sources=/etc/apt/sources.list
        else
            die "no Debian apt sources found: set MIRRORPROXY_APT_SOURCES=FILE"
        fi
    fi
    [ -r "$sources" ] || die "cannot read apt sources $sources"
    local arch recipe key cache tarball
    arch="$(dpkg --print-architecture)"
    # Anything that changes the tarball changes the key: the sources, the package list,
    # the architecture and this recipe's options.
    recipe="v1 bookworm $arch essential $base_packages merged-usr nodoc $base_path"
    key="$( { echo "$recipe"; grep -v '^#' "$sources"; } | sha256sum | cut -c1-16)"
    base="localhost/mirrorproxy-base:bookworm-$key"
    if has_image "$base"; then
        echo "== base $base (already in $engine)"
        return
    fi
    if [ "$(id -u)" = 0 ]; then
        cache="${MIRRORPROXY_BUILD_CACHE:-/var/cache/mirrorproxy-build}"
    else
        cache="${MIRRORPROXY_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrorproxy-build}"
    fi
    tarball="$cache/base-bookworm-$key.tar"
    mkdir -p "$cache"
    if [ -f "$tarball" ]; then
        echo "== base from $tarball"
    else
        echo "== mmdebstrap bookworm ($base_packages) from $sources"
        # The host's sources file is mmdebstrap's mirror argument, so the base comes from
        # wherever this machine gets Debian; the customize hook strips it again, since
        # the sources of the build machine mean nothing where the image runs.
        mmdebstrap --quiet --format=tar --variant=essential --include="$base_packages" \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/*' \
            bookworm "$tarball.tmp" "$sources"
        mv "$tarball.tmp" "$tarball"
    fi
    case "$engine" in
        podman) podman import --quiet --change "ENV $base_path" "$tarball" "$base" >/dev/null ;;
        docker) docker import --change "ENV $base_path" "$tarball" "$base" >/dev/null ;;
        buildah)
            local ctr
            ctr="$(buildah from scratch)"
            buildah add --quiet "$ctr" "$tarball" / >/dev/null
            buildah config --env "$base_path" "$ctr"
            buildah commit --quiet "$ctr" "$base" >/dev/null
            buildah rm "$ctr" >/dev/null
            ;;
    esac
}

build_args=()
if [ "$local_base" = 1 ]; then
    build_local_base
    build_args+=(--build-arg "BASE=$base")
fi

# pip inside the build trusts the host's CA bundle; an empty secret means "no bundle".
ca="${MIRRORPROXY_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [ ! -r "$ca" ]; then
    ca="$tmp/no-ca"
    : > "$ca"
fi
build_args+=(--secret "id=cacert,src=$ca" -f docker/Dockerfile -t "$tag")

echo "== $engine build $tag"
start=$SECONDS
case "$engine" in
    # --format docker: podman's default OCI format silently drops HEALTHCHECK.
    # --isolation chroot: the RUN steps need no namespaces of their own, and this works
    # where the OCI runtime cannot start containers (crun on a host with hybrid
    # cgroups v1/v2, a build inside a container).
    podman) podman build --format docker --isolation chroot "${build_args[@]}" . ;;
    docker) DOCKER_BUILDKIT=1 docker build "${build_args[@]}" . ;;
    buildah) buildah build --format docker --isolation chroot --layers "${build_args[@]}" . ;;
esac

case "$engine" in
    podman) size="$(podman image inspect --format '{{.Size}}' "$tag")" ;;
    docker) size="$(docker image inspect --format '{{.Size}}' "$tag")" ;;
    buildah) size="$(buildah inspect --type image --format '{{.Size}}' "$tag" 2>/dev/null || echo 0)" ;;
esac
awk -v t="$tag" -v s="$size" -v e="$engine" -v d=$((SECONDS - start)) \
    'BEGIN { printf "built %s with %s in %ds: %.1f MB\n", t, e, d, s / 1e6 }'

if [ -n "$save" ]; then
    rm -f "$save.tmp"
    case "$engine" in
        podman) podman save --quiet --format docker-archive -o "$save.tmp" "$tag" ;;
        docker) docker save -o "$save.tmp" "$tag" ;;
        buildah) buildah push --quiet "$tag" "docker-archive:$save.tmp:$tag" ;;
    esac
    mv "$save.tmp" "$save"
    echo "saved $tag to $save (docker-archive: ctr images import, podman load -i)"
fi
