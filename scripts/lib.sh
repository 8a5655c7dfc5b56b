# Shared bits of kiln's scripts. Source it; do not run it.

# Where test images, the test registry and the test state dir live between runs.
export KILN_TEST_ASSETS="${KILN_TEST_ASSETS:-/var/tmp/kiln-test-assets}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs the Debian packages kiln and its tests use, once; apt-get update only when a
# package is missing, so a warm machine pays nothing.
install_debian_packages() {
    local pkgs=(
        qemu-system-x86 qemu-utils e2fsprogs   # the VMM, overlays, ext4 images
        docker-registry skopeo umoci           # the local registry and the peers of the pull bench
        mmdebstrap zstd apache2-utils          # test base images, zstd layers, htpasswd for auth tests
        cpio file                              # initramfs inspection, static-binary checks
        curl python3-venv                      # HTTP in tests, the official Python SDK's venv
    )
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
