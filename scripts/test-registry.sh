#!/usr/bin/env bash
# A local OCI registry with kiln's test images, for the kiln-oci tests, the benchmark and
# the quickstart (Docker Hub and other public registries are out of reach on these hosts).
#
#   scripts/test-registry.sh start    start (or reuse) the registries, push the test images,
#                                     write $KILN_TEST_ASSETS/registry.env
#   scripts/test-registry.sh stop     stop the registries started by `start`
#   scripts/test-registry.sh env      print registry.env (fails when not running)
#
# Two instances of Debian's `docker-registry` (distribution 2.8) listen on free loopback
# ports: an open one and one behind htpasswd basic auth (user kiln / kiln-secret).
# registry.env holds shell assignments (KILN_TEST_REGISTRY=127.0.0.1:PORT, ...) that both
# this script's callers and the Rust tests read.
#
# Images (all built here from the rootfs trees of scripts/test-rootfs.sh, no network):
#   kiln/minbase:latest         OCI manifest, linux/amd64, 2 layers (gzip + zstd with whiteouts)
#   kiln/minbase-docker:latest  the same, as a Docker schema-2 manifest
#   library/minbase:latest      the same, under the Docker Hub path (mirror tests)
#   kiln/python:latest          python3 + curl, linux/amd64, 1 gzip layer
#   kiln/multi:latest           OCI index: linux/amd64 (= minbase) + linux/arm64 (tiny)
#   kiln/armonly:latest         OCI index: linux/arm64 + linux/arm/v7 only
#   kiln/alpine-like:latest     tiny, /etc/os-release ID=alpine + /lib/ld-musl-x86_64.so.1
#   kiln/noshell:latest         tiny, no /bin/sh
#   kiln/tiny:latest            tiny, with /bin/sh (also pushed to the auth registry)
#   kiln/huge:latest            tiny on the wire, 1100 MiB flattened (one sparse file)
#   kiln/authonly:latest        (auth registry only) the tiny image, absent from the open one
#
# Needs (Debian packages): docker-registry skopeo apache2-utils jq zstd coreutils tar gzip
# iproute2 curl, plus what scripts/test-rootfs.sh needs (mmdebstrap).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
assets="${KILN_TEST_ASSETS:-/var/tmp/kiln-test-assets}"
dir="$assets/registry"
envfile="$assets/registry.env"
# Bump when the image set changes so that `start` rebuilds and re-pushes.
images_version=5
auth_user=kiln
auth_pass=kiln-secret

log() { echo "test-registry: $*" >&2; }

ensure_tools() {
    local missing=()
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v skopeo >/dev/null || missing+=(skopeo)
    command -v htpasswd >/dev/null || missing+=(apache2-utils)
    command -v jq >/dev/null || missing+=(jq)
    command -v zstd >/dev/null || missing+=(zstd)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 20000))
        if ! ss -Hltn "sport = :$port" | grep -q .; then echo "$port"; return 0; fi
    done
    return 1
}

alive() { # alive PIDFILE ADDR
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && curl -fsS -o /dev/null -m 2 "http://$2/v2/" 2>/dev/null
}

alive_auth() { # like alive, but a 401 from /v2/ is the expected answer
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
        && [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://$2/v2/")" = 401 ]
}

start_instance() { # start_instance NAME ADDR [htpasswd-file]
    local name=$1 addr=$2 htp=${3:-}
    mkdir -p "$dir/$name/data"
    {
        echo "version: 0.1"
        echo "log: {level: warn}"
        echo "storage:"
        echo "  filesystem: {rootdirectory: $dir/$name/data}"
        echo "  delete: {enabled: true}"
        echo "http: {addr: $addr}"
        if [ -n "$htp" ]; then
            echo "auth:"
            echo "  htpasswd: {realm: kiln-test, path: $htp}"
        fi
    } >"$dir/$name/config.yml"
    setsid docker-registry serve "$dir/$name/config.yml" >"$dir/$name/log" 2>&1 </dev/null &
    echo $! >"$dir/$name/pid"
    for _ in $(seq 1 100); do
        if [ -n "$htp" ]; then alive_auth "$dir/$name/pid" "$addr" && return 0
        else alive "$dir/$name/pid" "$addr" && return 0; fi
        sleep 0.1
    done
    log "registry $name did not come up on $addr; log:"; cat "$dir/$name/log" >&2
    return 1
}

# ---- OCI layout building (by hand: the manifests are small JSON documents) ----------------

layout=""
blob() { # blob FILE -> prints sha256 hex, stores FILE in the layout
    local hex
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    [ -e "$layout/blobs/sha256/$hex" ] || cp "$1" "$layout/blobs/sha256/$hex"
    echo "$hex"
}
blob_json() { # blob_json JSON -> hex
    local tmp; tmp=$(mktemp "$work/json.XXXXXX")
    printf '%s' "$1" >"$tmp"
    blob "$tmp"
}
size_of() { stat -c %s "$1"; }

# make_layer DIR OUT COMPRESSION -> writes OUT (compressed), prints "hex size diffid mediatype"
make_layer() {
    local src=$1 out=$2 comp=$3 raw="$2.tar" diffid hex mt
    tar -C "$src" --numeric-owner --sort=name --mtime=@1700000000 --xattrs -cf "$raw" .
    diffid=$(sha256sum "$raw" | cut -d' ' -f1)
    case "$comp" in
        gzip) gzip -n -6 -c "$raw" >"$out"; mt=application/vnd.oci.image.layer.v1.tar+gzip ;;
        zstd) zstd -q -3 -c "$raw" >"$out"; mt=application/vnd.oci.image.layer.v1.tar+zstd ;;
        none) cp "$raw" "$out"; mt=application/vnd.oci.image.layer.v1.tar ;;
    esac
    rm -f "$raw"
    hex=$(blob "$out")
    echo "$hex $(size_of "$out") $diffid $mt"
}

# make_image ARCH VARIANT LAYERSPEC... -> prints "manifest-hex manifest-size"
# LAYERSPEC = "hex size diffid mediatype"
make_image() {
    local arch=$1 variant=$2; shift 2
    local layers="[]" diffids="[]" spec hex size diffid mt cfg cfghex man manhex
    for spec in "$@"; do
        read -r hex size diffid mt <<<"$spec"
        layers=$(jq -c --arg d "sha256:$hex" --argjson s "$size" --arg m "$mt" \
            '. + [{mediaType: $m, digest: $d, size: $s}]' <<<"$layers")
        diffids=$(jq -c --arg d "sha256:$diffid" '. + [$d]' <<<"$diffids")
    done
    cfg=$(jq -cn --arg a "$arch" --arg v "$variant" --argjson ids "$diffids" '{
        created: "2023-11-14T22:13:20Z", architecture: $a, os: "linux",
        config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                 Cmd: ["/bin/bash"], WorkingDir: "/", User: ""},
        rootfs: {type: "layers", diff_ids: $ids}} + (if $v == "" then {} else {variant: $v} end)')
    cfghex=$(blob_json "$cfg")
    man=$(jq -cn --arg c "sha256:$cfghex" --argjson cs "${#cfg}" --argjson l "$layers" '{
        schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
        layers: $l}')
    manhex=$(blob_json "$man")
    echo "$manhex ${#man}"
}

# tag_in_layout TAG MEDIATYPE HEX SIZE : add a ref to the layout's index.json
tag_in_layout() {
    local idx
    idx=$(jq -c --arg t "$1" --arg m "$2" --arg d "sha256:$3" --argjson s "$4" \
        '.manifests += [{mediaType: $m, digest: $d, size: $s, annotations: {"org.opencontainers.image.ref.name": $t}}]' \
        "$layout/index.json")
    printf '%s' "$idx" >"$layout/index.json"
}

make_index() { # make_index "hex size arch variant"... -> "hex size"
    local entries="[]" e hex size arch variant idx
    for e in "$@"; do
        read -r hex size arch variant <<<"$e"
        entries=$(jq -c --arg d "sha256:$hex" --argjson s "$size" --arg a "$arch" --arg v "$variant" \
            '. + [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $d, size: $s,
                   platform: ({architecture: $a, os: "linux"} + (if $v == "" then {} else {variant: $v} end))}]' \
            <<<"$entries")
    done
    idx=$(jq -cn --argjson m "$entries" '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: $m}')
    hex=$(blob_json "$idx")
    echo "$hex ${#idx}"
}

rootfs_dir() { # a rootfs from test-rootfs.sh as a directory (it may be a tarball or a tree)
    local name=$1 src="$assets/rootfs/$1.tar"
    if [ ! -e "$src" ]; then "$here/test-rootfs.sh" "$name"; fi
    if [ -d "$src" ]; then echo "$src"; return; fi
    mkdir -p "$work/tree-$name"
    tar -C "$work/tree-$name" --numeric-owner -xf "$src"
    echo "$work/tree-$name"
}

build_images() {
    work="$dir/build"
    rm -rf "$work"; mkdir -p "$work"
    layout="$work/layout"
    mkdir -p "$layout/blobs/sha256"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
    echo '{"schemaVersion":2,"manifests":[]}' >"$layout/index.json"
    local mt_man=application/vnd.oci.image.manifest.v1+json mt_idx=application/vnd.oci.image.index.v1+json

    log "building test images in $layout"
    local minbase python l1 l2 lp m_min m_py m_arm m_arm7 m_tiny d
    minbase=$(rootfs_dir minbase)
    python=$(rootfs_dir python)
    l1=$(make_layer "$minbase" "$work/l1" gzip)
    # Second layer: a new file, a whiteout of a lower file and an opaque directory.
    d="$work/l2"; mkdir -p "$d/etc" "$d/var/cache/debconf" "$d/usr/share"
    echo "layer two" >"$d/etc/kiln-layer2"
    : >"$d/etc/.wh.issue.net"
    : >"$d/var/cache/debconf/.wh..wh..opq"
    echo "only file" >"$d/var/cache/debconf/kiln-only"
    l2=$(make_layer "$d" "$work/l2.layer" zstd)
    m_min=$(make_image amd64 "" "$l1" "$l2")
    tag_in_layout minbase $mt_man $m_min
    # Docker schema 2 has no zstd media type: the same layers, both gzip.
    tag_in_layout minbase-gz $mt_man $(make_image amd64 "" "$l1" "$(make_layer "$d" "$work/l2g.layer" gzip)")

    lp=$(make_layer "$python" "$work/lp" gzip)
    m_py=$(make_image amd64 "" "$lp")
    tag_in_layout python $mt_man $m_py

    # Tiny trees for the arm variants and the vetting cases.
    d="$work/arm"; mkdir -p "$d/etc"; echo "ID=debian" >"$d/etc/os-release"
    m_arm=$(make_image arm64 v8 "$(make_layer "$d" "$work/arm.layer" gzip)")
    echo "arm7" >"$d/etc/arm7"
    m_arm7=$(make_image arm v7 "$(make_layer "$d" "$work/arm7.layer" gzip)")
    tag_in_layout multi $mt_idx $(make_index "$m_min amd64" "$m_arm arm64 v8")
    tag_in_layout armonly $mt_idx $(make_index "$m_arm arm64 v8" "$m_arm7 arm v7")

    d="$work/alpine"; mkdir -p "$d/etc" "$d/lib" "$d/bin"
    printf 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.0\n' >"$d/etc/os-release"
    cp "$minbase/usr/bin/dash" "$d/bin/busybox"; ln -s busybox "$d/bin/sh"
    : >"$d/lib/ld-musl-x86_64.so.1"
    tag_in_layout alpine-like $mt_man $(make_image amd64 "" "$(make_layer "$d" "$work/alpine.layer" gzip)")

    d="$work/noshell"; mkdir -p "$d/etc" "$d/app"
    echo "ID=debian" >"$d/etc/os-release"; echo "static" >"$d/app/server"
    tag_in_layout noshell $mt_man $(make_image amd64 "" "$(make_layer "$d" "$work/noshell.layer" none)")

    d="$work/tiny"; mkdir -p "$d/etc" "$d/usr/bin"
    echo "ID=debian" >"$d/etc/os-release"; cp "$minbase/usr/bin/dash" "$d/usr/bin/sh"; ln -s usr/bin "$d/bin"
    m_tiny=$(make_image amd64 "" "$(make_layer "$d" "$work/tiny.layer" gzip)")
    tag_in_layout tiny $mt_man $m_tiny

    # Larger flattened than any disk a spec may ask for (1100 MiB > the 1024 MiB minimum),
    # yet a few KiB on the wire: one sparse file, stored as a GNU sparse tar entry.
    d="$work/huge"; mkdir -p "$d/etc" "$d/usr/bin" "$d/var"
    echo "ID=debian" >"$d/etc/os-release"; cp "$minbase/usr/bin/dash" "$d/usr/bin/sh"; ln -s usr/bin "$d/bin"
    truncate -s 1100M "$d/var/zeros"
    tar -C "$d" --numeric-owner --sort=name --mtime=@1700000000 --sparse -cf "$work/huge.tar" .
    local hhex hsize hdiff
    hdiff=$(sha256sum "$work/huge.tar" | cut -d' ' -f1)
    gzip -n -6 -c "$work/huge.tar" >"$work/huge.layer"; rm -f "$work/huge.tar"
    hhex=$(blob "$work/huge.layer"); hsize=$(size_of "$work/huge.layer")
    tag_in_layout huge $mt_man $(make_image amd64 "" "$hhex $hsize $hdiff application/vnd.oci.image.layer.v1.tar+gzip")
    rm -rf "$work"/tree-*
}

push_images() {
    local reg=$1 areg=$2 t
    local opts=(--quiet --dest-tls-verify=false --src-tls-verify=false)
    for t in minbase python multi armonly alpine-like noshell tiny huge; do
        log "pushing kiln/$t"
        skopeo copy "${opts[@]}" --all "oci:$layout:$t" "docker://$reg/kiln/$t:latest"
    done
    skopeo copy "${opts[@]}" "docker://$reg/kiln/minbase:latest" "docker://$reg/library/minbase:latest"
    # Docker schema 2 (skopeo converts the OCI manifest and config media types).
    skopeo copy "${opts[@]}" --format v2s2 \
        "oci:$layout:minbase-gz" "docker://$reg/kiln/minbase-docker:latest"
    skopeo copy "${opts[@]}" --dest-creds "$auth_user:$auth_pass" \
        "oci:$layout:tiny" "docker://$areg/kiln/tiny:latest"
    skopeo copy "${opts[@]}" --dest-creds "$auth_user:$auth_pass" \
        "oci:$layout:tiny" "docker://$areg/kiln/authonly:latest"
}

cmd_start() {
    ensure_tools
    mkdir -p "$dir"
    local reg="" areg=""
    if [ -s "$envfile" ]; then
        # shellcheck disable=SC1090
        . "$envfile"
        reg=${KILN_TEST_REGISTRY:-}; areg=${KILN_TEST_AUTH_REGISTRY:-}
    fi
    if [ -n "$reg" ] && alive "$dir/open/pid" "$reg"; then
        log "reusing registry on $reg"
    else
        reg="127.0.0.1:$(free_port)"
        start_instance open "$reg"
    fi
    if [ -n "$areg" ] && alive_auth "$dir/auth/pid" "$areg"; then
        log "reusing auth registry on $areg"
    else
        htpasswd -Bbc "$dir/htpasswd" "$auth_user" "$auth_pass" 2>/dev/null
        areg="127.0.0.1:$(free_port)"
        start_instance auth "$areg" "$dir/htpasswd"
    fi
    local stamp="$dir/pushed-v$images_version-$reg-$areg"
    if [ ! -e "$stamp" ] || ! skopeo inspect --raw --tls-verify=false "docker://$reg/kiln/multi:latest" >/dev/null 2>&1; then
        build_images
        push_images "$reg" "$areg"
        rm -f "$dir"/pushed-*; touch "$stamp"
    fi
    local tmp="$envfile.tmp.$$"
    {
        echo "KILN_TEST_REGISTRY=$reg"
        echo "KILN_TEST_AUTH_REGISTRY=$areg"
        echo "KILN_TEST_AUTH_USER=$auth_user"
        echo "KILN_TEST_AUTH_PASSWORD=$auth_pass"
    } >"$tmp"
    mv -f "$tmp" "$envfile"
    cat "$envfile"
}

cmd_stop() {
    local n pid
    for n in open auth; do
        if [ -s "$dir/$n/pid" ]; then
            pid=$(cat "$dir/$n/pid")
            kill "$pid" 2>/dev/null && log "stopped $n ($pid)" || true
            rm -f "$dir/$n/pid"
        fi
    done
    rm -f "$envfile"
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) [ -s "$envfile" ] && cat "$envfile" || { log "not running: run scripts/test-registry.sh start"; exit 1; } ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
