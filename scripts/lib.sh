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
        chromium                               # the console's browser test (driven by Playwright)
    )
    # Two passes: installing one package can remove another (a backported qemu-utils on
    # the machine conflicts with Debian's qemu-system-x86 and apt removes it), and the
    # second pass puts back the matching version.
    local pass missing
    for pass in 1 2 3; do
        missing=()
        for p in "${pkgs[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
        done
        [ ${#missing[@]} -eq 0 ] && return 0
        if [ "$pass" -eq 3 ]; then
            echo "Debian packages still missing after installing them: ${missing[*]}" >&2
            return 1
        fi
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        [ "$pass" -eq 1 ] && apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    done
}
