#!/usr/bin/env bash
# debug-kernel.sh — build the lab's debug guest kernel (`pcisim lab ... --kernel 6.12-debug`):
# Debian's linux-source-<series> configured from x86_64_defconfig plus our fragment
# (qemu-scripts/debug-kernel.config: lockdep, atomic-sleep, debug objects, hung tasks, list and
# DMA-API checks, and what the lab's VMs need), built once per input hash.
#
#   * where: inside the trixie root provision.sh set up, at
#     $ROOT/usr/src/pcisim-kernel/<series>-<variant>-<hash>/tree — the tree is built chrooted
#     with the root's gcc, and stays there as the KDIR our guest modules (guest-tests/kmod) are
#     built against, chrooted with the same compiler (the lab treats it as a `--kernel-tree`
#     inside the root: crates/lab/src/kernel/),
#   * the build dependencies (gcc, make, flex, bison, bc, libelf-dev, libssl-dev, kmod...) and
#     the source package are Debian packages, installed/downloaded with apt-get chrooted into the
#     root, under the cache's lock (the one provision.sh and kselftest.sh take),
#   * the build itself runs under a lock of its own (a second caller waits for the first, then
#     uses its result) with `nice -n 19 make -j<jobs>` (default 2): it must not starve the VMs
#     of whoever else shares the machine,
#   * the hash covers the fragment(s), the series, the variant and RECIPE (below); a cached
#     build is found without the network. A build that failed or was interrupted is resumed by the next call
#     (make is incremental); its log is <dir>/build.log.
#
# Needs root (chroot, apt-get in the root) and provision.sh's trixie root.
# Progress goes to stderr ("[debug-kernel] ..." lines, one a minute while make runs); stdout
# carries only the PCISIM_DEBUG_* lines:
#   PCISIM_DEBUG_TREE       the built tree, as a host path
#   PCISIM_DEBUG_TREE_ROOT  the same tree as seen inside the root (for chrooted builds)
#   PCISIM_DEBUG_KVER       its release (uname -r)
#   PCISIM_DEBUG_SOURCE     the source package and version it was built from
#   PCISIM_DEBUG_BUILD_SECS seconds this call spent building (0: cached)
#
# Usage: qemu-scripts/debug-kernel.sh [--series 6.12] [--variant debug] [--jobs 2] [--cached-only]
#   --variant debug     debug-kernel.config (the only variant so far; a KASAN one would add its
#                       own fragment on top, see docs/lab.md)
#   --cached-only       print the lines of a cached build, or exit 3 if there is none
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${PCISIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pcisim}
ROOT=$CACHE/trixie-root
SERIES=6.12
VARIANT=debug
JOBS=2
CACHED_ONLY=0
BACKPORTS=trixie-backports
# Debian packages the build needs in the root. gcc: the trixie default compiler (gcc-14, the
# one Debian's 6.12 and 7.3 kernels are built with) as plain `gcc`, so that out-of-tree builds
# against the tree (`make M=...`, no CC=) use the same compiler as the tree.
BUILD_DEPS=(gcc make libc6-dev flex bison bc libelf-dev libssl-dev kmod perl xz-utils)

log() { printf '[debug-kernel] %s\n' "$*" >&2; }
die() { printf '[debug-kernel] error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --series) SERIES=${2:?}; shift 2 ;;
        --variant) VARIANT=${2:?}; shift 2 ;;
        --jobs) JOBS=${2:?}; shift 2 ;;
        --cached-only) CACHED_ONLY=1; shift ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

case $SERIES in
    6.12|7.3) ;;
    *) die "unsupported --series '$SERIES' (supported: 6.12, 7.3)" ;;
esac
FRAGMENTS=("$HERE/debug-kernel.config")
case $VARIANT in
    debug) ;;
    *) die "unknown --variant '$VARIANT' (supported: debug)" ;;
esac
for f in "${FRAGMENTS[@]}"; do [[ -f $f ]] || die "missing config fragment $f"; done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a positive number"

PKG=linux-source-$SERIES
# The version of the configure and build steps below: bump it when a change to them changes
# what gets built (other edits to this script must not cost a 20-minute rebuild).
RECIPE=1
# What the build depends on: the fragments, the series, the variant and RECIPE. Not the package
# version: finding it needs the network, and a cached build must not (the version is recorded
# in the stamp and printed).
inputs_hash=$(cat "${FRAGMENTS[@]}" | { cat; printf '%s %s recipe %s\n' "$SERIES" "$VARIANT" "$RECIPE"; } \
    | sha256sum | cut -c1-12)
NAME=$SERIES-$VARIANT-$inputs_hash
BASE_IN_ROOT=/usr/src/pcisim-kernel
DIR_IN_ROOT=$BASE_IN_ROOT/$NAME
DIR=$ROOT$DIR_IN_ROOT
TREE=$DIR/tree

emit() {
    printf 'PCISIM_DEBUG_TREE=%s\nPCISIM_DEBUG_TREE_ROOT=%s\nPCISIM_DEBUG_KVER=%s\nPCISIM_DEBUG_SOURCE=%s\nPCISIM_DEBUG_BUILD_SECS=%s\n' \
        "$TREE" "$DIR_IN_ROOT/tree" "$(cat "$TREE/include/config/kernel.release")" \
        "$(cat "$DIR/stamp")" "$1"
}
built() { [[ -f $DIR/stamp && -f $TREE/arch/x86/boot/bzImage && -f $TREE/Module.symvers ]]; }

if built; then
    log "cached: $TREE ($(cat "$TREE/include/config/kernel.release"), $(cat "$DIR/stamp"))"
    emit 0
    exit 0
fi
((CACHED_ONLY)) && { log "no cached build $NAME"; exit 3; }

[[ -x $ROOT/usr/bin/apt-get ]] || die "no trixie root at $ROOT: run qemu-scripts/provision.sh first"
[[ $(id -u) -eq 0 ]] || die "the debug kernel is built chrooted into $ROOT, which needs root"

# One build of this name at a time; whoever waited uses the result.
mkdir -p "$CACHE"
exec 8>"$CACHE/.debug-kernel-$SERIES-$VARIANT.lock"
if ! flock -n 8; then
    log "another process is building the $SERIES-$VARIANT kernel; waiting for it (lock $CACHE/.debug-kernel-$SERIES-$VARIANT.lock)"
    flock 8
fi
if built; then
    log "built meanwhile by the other process: $TREE"
    emit 0
    exit 0
fi

rchroot() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        HOME=/tmp DEBIAN_FRONTEND=noninteractive "$@"
}
rapt() { rchroot apt-get -q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 "$@"; }
# shellcheck disable=SC2016  # a dpkg-query format, not a shell expression
rdpkg_installed() { [[ $(rchroot dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii " ]]; }
root_apt_cleanup() {
    rapt clean >&2 || true
    find "$ROOT/var/lib/apt/lists" -mindepth 1 -maxdepth 1 -type f ! -name lock -delete 2>/dev/null || true
    rm -rf "$ROOT/var/lib/apt/lists/partial/"* 2>/dev/null || true
}

t0=$SECONDS
# --- Packages (under the cache's lock, shared with provision.sh and kselftest.sh) -------------
if [[ ! -f $DIR/.unpacked ]] || ! for p in "${BUILD_DEPS[@]}"; do rdpkg_installed "$p" || exit 1; done; then
    exec 9>"$CACHE/.lock"
    log "waiting for the cache lock (apt in the root)"
    flock 9
    rapt update >&2 || die "apt-get update in $ROOT failed"
    missing=()
    for p in "${BUILD_DEPS[@]}"; do rdpkg_installed "$p" || missing+=("$p"); done
    if ((${#missing[@]})); then
        log "installing the build dependencies in the root: ${missing[*]}"
        # -t backports, as provision.sh: the root's libelf1t64 came from backports with QEMU,
        # and libelf-dev must match it.
        rapt -y -t "$BACKPORTS" install --no-install-recommends "${missing[@]}" >&2 \
            || { root_apt_cleanup; die "apt-get install ${missing[*]} in $ROOT failed"; }
    fi
    if [[ ! -f $DIR/.unpacked ]]; then
        ver=$(rchroot apt-cache madison "$PKG" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2; exit}')
        [[ -n $ver ]] || { root_apt_cleanup; die "no $PKG in the root's apt sources (trixie, $BACKPORTS)"; }
        rm -rf "$DIR"
        mkdir -p "$DIR"
        log "downloading $PKG $ver"
        # shellcheck disable=SC2016  # expanded by the chrooted sh
        rchroot sh -c 'cd "$1" && apt-get -q -o APT::Sandbox::User=root download "$2"' sh \
            "$DIR_IN_ROOT" "$PKG=$ver" >&2 || { root_apt_cleanup; die "apt-get download $PKG=$ver failed"; }
        echo "$PKG $ver" >"$DIR/source"
    fi
    root_apt_cleanup
    flock -u 9
    exec 9>&-
fi

if [[ ! -f $DIR/.unpacked ]]; then
    deb=$(ls "$DIR"/*.deb)
    log "unpacking $(cat "$DIR/source") into $TREE"
    rm -rf "$TREE" "$DIR/$PKG"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$PKG.tar.xz" | xz -dc | tar -x -C "$DIR" \
        || die "unpacking $deb failed"
    mv "$DIR/$PKG" "$TREE"
    rm -f "$deb"
    [[ -f $TREE/Makefile && -f $TREE/arch/x86/configs/x86_64_defconfig ]] || die "$PKG has no x86_64_defconfig"
    touch "$DIR/.unpacked"
fi

# --- Configure --------------------------------------------------------------------------------
cp "${FRAGMENTS[@]}" "$DIR/"
frags_in_root=()
for f in "${FRAGMENTS[@]}"; do frags_in_root+=("$DIR_IN_ROOT/${f##*/}"); done
BUILDLOG=$DIR/build.log
: >"$BUILDLOG"
log "configuring: x86_64_defconfig + ${FRAGMENTS[*]##*/}"
rchroot sh -c 'cd "$1" && shift && make -s x86_64_defconfig && scripts/kconfig/merge_config.sh -m .config "$@" && make -s olddefconfig' \
    sh "$DIR_IN_ROOT/tree" "${frags_in_root[@]}" >>"$BUILDLOG" 2>&1 \
    || die "configuring failed; see $BUILDLOG"

# Every option of the fragments must have come out as written: Kconfig drops what it cannot set
# (a dependency off, a renamed option) with no more than a warning.
dropped=()
while IFS= read -r line; do
    case $line in
        CONFIG_*=*)
            opt=${line%%=*}
            grep -qxF "$line" "$TREE/.config" || dropped+=("$line (got: $(grep -E "^(# )?$opt[= ]" "$TREE/.config" || echo absent))")
            ;;
        "# CONFIG_"*" is not set")
            opt=${line#"# "}
            opt=${opt%% *}
            if grep -qE "^$opt=" "$TREE/.config"; then dropped+=("$line (got: $(grep -E "^$opt=" "$TREE/.config"))"); fi
            ;;
    esac
done < <(cat "${FRAGMENTS[@]}")
if ((${#dropped[@]})); then
    printf '[debug-kernel]   %s\n' "${dropped[@]}" >&2
    die "the config fragment did not apply: the option(s) above came out differently (see $BUILDLOG)"
fi

# --- Build ------------------------------------------------------------------------------------
total_objs=
[[ -s $ROOT$BASE_IN_ROOT/objs-$SERIES-$VARIANT ]] && total_objs=$(cat "$ROOT$BASE_IN_ROOT/objs-$SERIES-$VARIANT")
log "building bzImage and modules: nice -n 19 make -j$JOBS (log $BUILDLOG)"
tb=$SECONDS
# Not through rchroot (a function would run in a subshell): chroot, env, setpriv and nice exec
# each other, so $! is make itself, which passes a SIGTERM on to its jobs; and make gets a
# SIGTERM when this script dies, however it dies (setpriv --pdeathsig).
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/tmp \
    setpriv --pdeathsig TERM nice -n 19 make -C "$DIR_IN_ROOT/tree" -j"$JOBS" bzImage modules >>"$BUILDLOG" 2>&1 &
make_pid=$!
# If we are stopped, stop make too.
trap 'kill "$make_pid" 2>/dev/null || true; wait "$make_pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
while kill -0 "$make_pid" 2>/dev/null; do
    for _ in $(seq 60); do kill -0 "$make_pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$make_pid" 2>/dev/null || break
    n=$(find "$TREE" -name '*.o' -newer "$DIR/.unpacked" 2>/dev/null | wc -l)
    log "building: $n objects after $(((SECONDS - tb) / 60)) min${total_objs:+ (a full build has ~$total_objs)}"
done
rc=0
wait "$make_pid" || rc=$?
trap - EXIT INT TERM
if ((rc)); then
    tail -n 30 "$BUILDLOG" | sed 's/^/[debug-kernel]   /' >&2
    die "make failed (exit $rc) after $((SECONDS - tb)) s; the whole log: $BUILDLOG"
fi
tm=$((SECONDS - tb))
find "$TREE" -name '*.o' | wc -l >"$ROOT$BASE_IN_ROOT/objs-$SERIES-$VARIANT"
[[ -f $TREE/arch/x86/boot/bzImage && -f $TREE/Module.symvers ]] || die "make succeeded but left no bzImage/Module.symvers"
echo "$(cat "$DIR/source"), x86_64_defconfig + ${FRAGMENTS[*]##*/}, built in $tm s with -j$JOBS" >"$DIR/stamp"

# Keep at most this build and the newest other one of the series/variant (~3 GB each): an older
# checkout may still be using the previous one.
mapfile -t others < <(ls -1dt "$ROOT$BASE_IN_ROOT/$SERIES-$VARIANT-"* 2>/dev/null | grep -vxF "$DIR" || true)
for old in "${others[@]:1}"; do
    log "removing an old build: $old"
    rm -rf "${old:?}"
done

log "built $(cat "$TREE/include/config/kernel.release") in $tm s (make) / $((SECONDS - t0)) s (all): $TREE"
emit "$((SECONDS - t0))"
