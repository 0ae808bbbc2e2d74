#!/usr/bin/env bash
# kselftest.sh — build the kernel's vfio selftests (tools/testing/selftests/vfio) as static
# binaries for the lab's guest, with pcisim's driver for the selftests' driver library.
#
#   * the source: Debian's linux-source-<series> (trixie-backports' linux-source-7.3; 6.12's
#     source has no tools/testing/selftests/vfio), downloaded with apt-get inside the trixie
#     root that provision.sh set up, unpacked there (without Documentation/),
#   * the patch step: guest-tests/kselftest/drivers/pcisim_gpu/ and the register header are
#     copied into lib/drivers/pcisim_gpu/ and added to the library's driver list (libvfio.mk and
#     the ops table of lib/vfio_pci_driver.c) — the only change made to the kernel source,
#   * the build: `make headers` in the source tree, then the selftests' Makefile with
#     LDFLAGS=-static, chrooted into the root with its gcc (libc6-dev and uuid-dev are installed
#     there if missing),
#   * the cache: $CACHE/kselftest/<package version>-<hash of our driver, header and this
#     script>/ holds the binaries and a stamp; a second run with the same inputs only prints.
#
# Needs provision.sh to have run (the trixie root and its toolchain) and root (chroot, apt-get).
# Logs go to stderr; stdout carries only PCISIM_KSELFTEST_* lines.
#
# Usage: qemu-scripts/kselftest.sh [--series 7.3] [--driver-dir DIR] [--regs FILE]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${PCISIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pcisim}
ROOT=$CACHE/trixie-root
SERIES=7.3
DRIVER_DIR=$REPO/guest-tests/kselftest/drivers/pcisim_gpu
REGS=$REPO/guest-tests/kmod/pcisim_regs.h
BACKPORTS=trixie-backports
# The tests the lab runs (vfio_iommufd_setup_test and vfio_pci_sriov_uapi_test are built too:
# the Makefile builds every program; they are copied but the lab does not run them).
TESTS=(vfio_pci_device_test vfio_dma_mapping_test vfio_dma_mapping_mmio_test
    vfio_pci_device_init_perf_test vfio_pci_driver_test vfio_iommufd_setup_test)

log() { printf '[kselftest] %s\n' "$*" >&2; }
die() { printf '[kselftest] error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --series) SERIES=${2:?}; shift 2 ;;
        --driver-dir) DRIVER_DIR=${2:?}; shift 2 ;;
        --regs) REGS=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

[[ -x $ROOT/usr/bin/apt-get ]] || die "no trixie root at $ROOT: run qemu-scripts/provision.sh first"
[[ -f $DRIVER_DIR/pcisim_gpu.c ]] || die "no $DRIVER_DIR/pcisim_gpu.c"
[[ -f $REGS ]] || die "no register header $REGS"
[[ $(id -u) -eq 0 ]] || die "the selftests are built chrooted into $ROOT, which needs root"

rchroot() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}
rapt() { rchroot apt-get -q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 "$@"; }
root_apt_cleanup() {
    rapt clean >&2 || true
    find "$ROOT/var/lib/apt/lists" -mindepth 1 -maxdepth 1 -type f ! -name lock -delete 2>/dev/null || true
}

mkdir -p "$CACHE/kselftest"
# provision.sh uses the root's apt too: the same lock serialises us with it.
exec 9>"$CACHE/.lock"
flock 9

PKG=linux-source-$SERIES
# What the inputs hash to: our driver, the header and this script (its patch step).
inputs_hash=$(cat "$DRIVER_DIR"/* "$REGS" "$0" | sha256sum | cut -c1-12)

# The newest cached build of this series with these inputs, if any (no network needed then).
cached=
for d in "$CACHE"/kselftest/"$PKG"_*-"$inputs_hash"; do
    [[ -f $d/stamp ]] && cached=$d
done
if [[ -n $cached ]]; then
    log "cached: $cached"
    printf 'PCISIM_KSELFTEST_BIN=%s\nPCISIM_KSELFTEST_SOURCE=%s\nPCISIM_KSELFTEST_BUILD_SECS=0\n' \
        "$cached/bin" "$(cat "$cached/stamp")"
    exit 0
fi

t0=$SECONDS
rapt update >&2 || die "apt-get update in $ROOT failed"
trap root_apt_cleanup EXIT
ver=$(rchroot apt-cache madison "$PKG" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2; exit}')
[[ -n $ver ]] || die "no $PKG in trixie/$BACKPORTS (Debian ships the vfio selftests from 7.3 on; 6.12's source has none)"
out=$CACHE/kselftest/${PKG}_$ver-$inputs_hash
src_parent=/var/tmp/pcisim-kselftest/$PKG-$ver
src=$src_parent/$PKG

# Build dependencies in the root (static libc, static libuuid), only if missing.
missing=()
for p in libc6-dev uuid-dev; do
    [[ $(rchroot dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null) == "ii " ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing in the root: ${missing[*]}"
    rapt -y install --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
fi
cc=$(cd "$ROOT/usr/bin" && ls gcc-[0-9]* 2>/dev/null | grep -E '^gcc-[0-9]+$' | sort -V | tail -n1)
[[ -n $cc ]] || die "no gcc-N in $ROOT (provision.sh installs the guest kernel's gcc)"

if [[ ! -f $ROOT$src_parent/.unpacked ]]; then
    log "downloading $PKG $ver"
    rm -rf "$ROOT$src_parent"
    mkdir -p "$ROOT$src_parent"
    # shellcheck disable=SC2016  # expanded by the chrooted sh
    rchroot sh -c 'cd "$1" && apt-get -q -o APT::Sandbox::User=root download "$2"' sh \
        "$src_parent" "$PKG=$ver" >&2 || die "apt-get download $PKG=$ver failed"
    log "unpacking $PKG $ver (without Documentation/)"
    deb=$(ls "$ROOT$src_parent"/*.deb)
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$PKG.tar.xz" | xz -dc \
        | tar -x -C "$ROOT$src_parent" --exclude="$PKG/Documentation" \
        || die "unpacking $deb failed"
    rm -f "$deb"
    [[ -d $ROOT$src/tools/testing/selftests/vfio ]] \
        || die "$PKG $ver has no tools/testing/selftests/vfio"
    touch "$ROOT$src_parent/.unpacked"
fi

# The patch step: our driver into the library's driver list. Idempotent.
vdir=$ROOT$src/tools/testing/selftests/vfio
rm -rf "$vdir/lib/drivers/pcisim_gpu"
mkdir -p "$vdir/lib/drivers/pcisim_gpu"
cp "$DRIVER_DIR"/* "$REGS" "$vdir/lib/drivers/pcisim_gpu/"
grep -q pcisim_gpu "$vdir/lib/libvfio.mk" \
    || sed -i 's|^LIBVFIO_C += drivers/igb/igb.c$|&\nLIBVFIO_C += drivers/pcisim_gpu/pcisim_gpu.c|' "$vdir/lib/libvfio.mk"
grep -q pcisim_gpu "$vdir/lib/vfio_pci_driver.c" \
    || sed -i -e 's|^extern struct vfio_pci_driver_ops igb_ops;$|&\nextern struct vfio_pci_driver_ops pcisim_gpu_ops;|' \
        -e 's|^\t&igb_ops,$|&\n\t\&pcisim_gpu_ops,|' "$vdir/lib/vfio_pci_driver.c"
grep -q 'drivers/pcisim_gpu/pcisim_gpu.c' "$vdir/lib/libvfio.mk" \
    && [[ $(grep -c pcisim_gpu_ops "$vdir/lib/vfio_pci_driver.c") -eq 2 ]] \
    || die "the patch step did not apply to $PKG $ver (lib/libvfio.mk or lib/vfio_pci_driver.c changed shape)"

# The harness's per-test timeouts (30 s by default, 60 s for memcpy_storm) are for hardware;
# the lab's guest runs under TCG, where vfio_pci_driver_test's fixture alone (1 GiB mapped in
# 4 KiB pages through the vIOMMU, then memset) takes ~20-30 s. Scale every timeout by
# TIMEOUT_SCALE in our copy of the harness (a test killed for its timeout leaves its vfio group
# busy while the kernel tears its mappings down, failing the next tests with EBUSY).
TIMEOUT_SCALE=10
harness=$ROOT$src/tools/testing/selftests/kselftest_harness.h
grep -q 'pcisim: TCG' "$harness" \
    || sed -i "s|poll(&poll_child, 1, t->timeout \* 1000);|poll(\&poll_child, 1, t->timeout * 1000 * $TIMEOUT_SCALE); /* pcisim: TCG */|" "$harness"
grep -q "t->timeout \* 1000 \* $TIMEOUT_SCALE); /\* pcisim: TCG \*/" "$harness" \
    || die "the timeout patch did not apply to $harness"

log "building: make headers, then tools/testing/selftests/vfio (static, $cc)"
tb=$SECONDS
rchroot make -C "$src" -s -j"$(nproc)" CC="$cc" HOSTCC="$cc" headers >&2 || die "make headers failed"
th=$((SECONDS - tb))
rchroot make -C "$src/tools/testing/selftests/vfio" -s -j"$(nproc)" CC="$cc" LDFLAGS=-static >&2 \
    || die "building the vfio selftests failed"
tt=$((SECONDS - tb - th))

rm -rf "$out.tmp"
mkdir -p "$out.tmp/bin"
for t in "${TESTS[@]}"; do
    f=$vdir/$t
    [[ -x $f ]] || die "$t was not built"
    file -b "$f" 2>/dev/null | grep -q 'statically linked' || ! command -v file >/dev/null \
        || die "$t is not statically linked"
    cp "$f" "$out.tmp/bin/"
done
echo "$PKG $ver" >"$out.tmp/stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
total=$((SECONDS - t0))
log "built in $total s (make headers $th s, selftests $tt s): $out/bin"
printf 'PCISIM_KSELFTEST_BIN=%s\nPCISIM_KSELFTEST_SOURCE=%s\nPCISIM_KSELFTEST_BUILD_SECS=%s\n' \
    "$out/bin" "$PKG $ver" "$total"
