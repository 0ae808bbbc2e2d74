#!/usr/bin/env bash
# provision.sh — get everything the pcisim lab needs to boot a Linux guest under QEMU:
#
#   * a QEMU >= 10.1 with the vfio-user-pci device (the system one, or QEMU 11.x from Debian
#     trixie-backports installed into a private trixie root and run rootless through that root's
#     own dynamic loader),
#   * a Debian trixie guest kernel (vmlinuz + its module tree, depmod'ed) and a static busybox,
#   * a toolchain for guest kernel modules inside the trixie root: that exact kernel's
#     linux-headers, the gcc it was built with, make (the lab builds guest-tests/kmod/ chrooted),
#   * a verdict on the accelerator: nested KVM on our CI machines "works" until Linux boots and then
#     dies with "KVM internal error ... emulation failure"; the kvm-ioctls probe (`pcisim lab
#     kvm-probe`) says so in milliseconds, and a tiny initramfs boot confirms a KVM it accepts.
#
# Everything lives in a cache outside the repository (see CACHE below). The script is idempotent:
# each step leaves a stamp and is skipped when the stamp is there, so a second run takes seconds.
# Logs and progress go to stderr; stdout carries only the final PCISIM_* lines (for `eval`/`source`).
#
# Each guest kernel series has its own cache entry ($CACHE/guest/debian-<series>: vmlinuz, config,
# the depmod'ed module tree) and its own headers in the trixie root; provisioning one series never
# removes or rewrites another's. (Users' own kernels, `pcisim lab --kernel-image/--kernel-tree`, live
# in guest/image-<hash> and guest/tree-<hash> entries the lab makes itself; this script never
# touches them.)
#
# Usage: qemu-scripts/provision.sh [--kernel 6.12|7.3] [--print-env] [--help]
set -euo pipefail

CACHE=${PCISIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pcisim}
KERNEL=6.12
PRINT_ENV=0

# The Debian release the guest and the QEMU root come from. trixie has the 6.12 LTS kernel;
# trixie-backports has QEMU 11.x (the first Debian QEMU with vfio-user-pci) and newer kernels.
SUITE=trixie
BACKPORTS=trixie-backports
# Combined Debian keyring. bookworm's debian-archive-keyring >= 2023.3+deb12u1 already contains
# the trixie (13) archive keys, so the trixie signatures verify with the host's own package.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KEYRING_TRIXIE_PART=/usr/share/keyrings/debian-archive-trixie-automatic.gpg

# Minimum QEMU we accept from the system: vfio-user-pci landed upstream in 10.1.
QEMU_MIN_MAJOR=10
QEMU_MIN_MINOR=1

ACCEL_MARKER=PCISIM-ACCEL-OK
ACCEL_TIMEOUT=60

usage() {
    cat <<EOF
Usage: $0 [--kernel VER] [--print-env] [--help]

Provision QEMU (with vfio-user-pci), a Debian guest kernel + modules, busybox, and detect
whether KVM works (else TCG). Cache: \$PCISIM_CACHE, default \${XDG_CACHE_HOME:-\$HOME/.cache}/pcisim
(now: $CACHE).

  --kernel VER   guest kernel series: 6.12 (default, Debian $SUITE) or 7.3 ($BACKPORTS)
  --print-env    print the PCISIM_* lines if everything is already provisioned; else exit 1
  --help         this text

On success prints to stdout:
  PCISIM_QEMU= PCISIM_QEMU_VERSION= PCISIM_KERNEL= PCISIM_KVER= PCISIM_MODULES=
  PCISIM_BUSYBOX= PCISIM_ACCEL= PCISIM_CPU= PCISIM_KBUILD_ROOT= PCISIM_KHEADERS=
  PCISIM_KCONFIG= PCISIM_CACHE=

The kernel module toolchain step installs packages into the trixie root with chroot, so it needs
root; run as another user it stops with an error (once done, any user can use the result).
EOF
}

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --kernel) [[ $# -ge 2 ]] || die "--kernel needs a value"; KERNEL=$2; shift 2 ;;
        --kernel=*) KERNEL=${1#--kernel=}; shift ;;
        --print-env) PRINT_ENV=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# Which Debian suite each supported guest kernel series comes from. Adding a series is one line
# here; the rest is generic. (The lab's own list, crates/lab/src/kernel/mod.rs, must say the same.)
kernel_suite() {
    case $1 in
        6.12) echo "$SUITE" ;;
        7.3) echo "$BACKPORTS" ;;
        *) return 1 ;;
    esac
}
kernel_suite "$KERNEL" >/dev/null || die "unsupported --kernel '$KERNEL' (supported: 6.12, 7.3)"

BIN=$CACHE/bin
WRAPPER=$BIN/qemu-system-x86_64
ROOT=$CACHE/trixie-root
STAMPS=$CACHE/stamps
APTDIR=$CACHE/apt
GUEST=$CACHE/guest
# This series' own cache entry. (Before kernels had entries of their own it was guest/<series>.)
ENTRY=debian-$KERNEL
KDIR=$GUEST/$ENTRY
BUSYBOX=$GUEST/busybox
ACCEL_FILE=$CACHE/accel
LOGS=$CACHE/logs

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

is_root() { [[ $(id -u) -eq 0 ]]; }

# On exit (also on error or Ctrl-C): kill a QEMU probe still running, drop scratch directories
# (all named $CACHE/tmp.*; only removed by the process holding the lock, see below).
CHILD_PID=
HAVE_LOCK=0
cleanup() {
    if [[ -n $CHILD_PID ]]; then kill "$CHILD_PID" 2>/dev/null || true; wait "$CHILD_PID" 2>/dev/null || true; fi
    if ((HAVE_LOCK)); then rm -rf "$CACHE"/tmp.*; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mktempdir() { mktemp -d "$CACHE/tmp.XXXXXX"; }

# "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)" -> 11.1.3
qemu_version_of() { "$@" -version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1; }
qemu_has_vfio_user() { "$@" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; }
version_at_least() { # VERSION MAJOR MINOR
    local maj min
    IFS=. read -r maj min _ <<<"$1"
    [[ -n $maj && -n $min ]] || return 1
    ((maj > $2 || (maj == $2 && min >= $3)))
}

# The Debian mirror the host's apt already uses (so we go through the same proxy/mirror), taken
# from the entry for the host's own release (not -security, not third-party repositories).
# Override with PCISIM_MIRROR. Falls back to deb.debian.org.
detect_mirror() {
    if [[ -n ${PCISIM_MIRROR:-} ]]; then echo "${PCISIM_MIRROR%/}"; return; fi
    local codename uri
    # shellcheck source=/dev/null
    codename=$( . /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")
    uri=$(
        shopt -s nullglob
        # deb822 *.sources: paragraphs with Types/URIs/Suites (and maybe Enabled: no).
        for f in /etc/apt/sources.list.d/*.sources; do
            awk -v want="$codename" '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled != "no")
                        for (i = 1; i <= ns; i++) if (suites[i] == want) { print uris; exit }
                    types = ""; uris = ""; enabled = ""; ns = 0
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                tolower($1) == "types:" { types = substr($0, index($0, ":") + 2) }
                tolower($1) == "uris:" { uris = $2 }
                tolower($1) == "enabled:" { enabled = tolower($2) }
                tolower($1) == "suites:" { ns = split(substr($0, index($0, ":") + 1), suites, " ") }
                END { flush() }' "$f"
        done
        # one-line format: deb [opts] URI SUITE COMPONENTS...
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f $f ]] || continue
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk -v want="$codename" '$1 == "deb" && $3 == want { print $2 }'
        done
    )
    uri=$(grep -E '^https?://' <<<"$uri" | head -n1 || true)
    uri=${uri:-http://deb.debian.org/debian}
    echo "${uri%/}"
}

# ---------------------------------------------------------------------------------------------
# State queries (used both by the normal run and by --print-env, which must not change anything)
# ---------------------------------------------------------------------------------------------

boot_id() { cat /proc/sys/kernel/random/boot_id; }

# Print "KEY=value" lines of the accel cache if it belongs to the current host boot.
accel_cached() {
    [[ -f $ACCEL_FILE ]] || return 1
    grep -qx "boot_id=$(boot_id)" "$ACCEL_FILE" || return 1
    grep -E '^(accel|cpu)=' "$ACCEL_FILE" | grep -c . | grep -qx 2 || return 1
    cat "$ACCEL_FILE"
}
accel_get() { accel_cached | sed -n "s/^$1=//p"; }

guest_ready() { [[ -s $KDIR/kver && -f $KDIR/vmlinuz && -f $KDIR/modules/modules.dep && -x $BUSYBOX ]]; }

# The kernel module toolchain in the root matches the guest kernel: the stamp (one per series)
# holds the "PACKAGE VERSION KVER" it was installed for (a re-provisioned kernel invalidates it).
KBUILD_STAMP=$STAMPS/kbuild-$ENTRY
kbuild_id() { [[ -s $KDIR/package && -s $KDIR/kver ]] && printf '%s %s\n' "$(cat "$KDIR/package")" "$(cat "$KDIR/kver")"; }
# The headers directory as seen inside the root (what `make -C` gets when chrooted).
kheaders() { echo "/usr/src/linux-headers-$(cat "$KDIR/kver")"; }
kbuild_ready() {
    local id
    id=$(kbuild_id) || return 1
    [[ -f $KBUILD_STAMP && $(cat "$KBUILD_STAMP") == "$id" ]] || return 1
    [[ -f $ROOT$(kheaders)/Makefile && -f $ROOT$(kheaders)/Module.symvers && -x $ROOT/usr/bin/make ]]
}

emit_env() {
    local ver
    ver=$(qemu_version_of "$WRAPPER")
    [[ -n $ver ]] || die "QEMU wrapper $WRAPPER does not run"
    cat <<EOF
PCISIM_QEMU=$WRAPPER
PCISIM_QEMU_VERSION=$ver
PCISIM_KERNEL=$KDIR/vmlinuz
PCISIM_KVER=$(cat "$KDIR/kver")
PCISIM_MODULES=$KDIR/modules
PCISIM_BUSYBOX=$BUSYBOX
PCISIM_ACCEL=$(accel_get accel)
PCISIM_CPU=$(accel_get cpu)
PCISIM_KBUILD_ROOT=$ROOT
PCISIM_KHEADERS=$(kheaders)
PCISIM_KCONFIG=$KDIR/config
PCISIM_CACHE=$CACHE
EOF
}

if ((PRINT_ENV)); then
    missing=()
    [[ -x $WRAPPER ]] || missing+=("QEMU wrapper ($WRAPPER)")
    guest_ready || missing+=("guest kernel $KERNEL / busybox (under $GUEST)")
    accel_cached >/dev/null || missing+=("accelerator verdict for this boot ($ACCEL_FILE)")
    kbuild_ready || missing+=("kernel module toolchain in $ROOT (stamp $KBUILD_STAMP)")
    if ((${#missing[@]})); then
        printf '[provision] not provisioned: %s\n' "${missing[@]}" >&2
        die "run $0${KERNEL:+ --kernel $KERNEL} first"
    fi
    emit_env
    exit 0
fi

mkdir -p "$CACHE" "$STAMPS" "$LOGS" "$BIN"
# Several lab runs may provision at once: serialise them.
exec 9>"$CACHE/.lock"
flock 9
HAVE_LOCK=1
rm -rf "$CACHE"/tmp.*   # leftovers of an interrupted run

# A cache from before per-kernel entries (guest/6.12, stamps/kbuild): this series' entry and
# stamp are made from them (hard-linked, not re-downloaded). The old ones stay for older checkouts
# sharing the cache (which know only 6.12); `rm -rf $GUEST/6.12 $STAMPS/kbuild` once none is left.
if [[ -d $GUEST/$KERNEL && ! -e $KDIR && -s $GUEST/$KERNEL/kver ]]; then
    cp -al "$GUEST/$KERNEL" "$KDIR.tmp" && mv "$KDIR.tmp" "$KDIR"
    log "cache entry $KDIR made from the old $GUEST/$KERNEL"
fi
if [[ -f $STAMPS/kbuild && ! -e $KBUILD_STAMP ]] \
    && [[ $(cut -d' ' -f1 "$STAMPS/kbuild") == linux-image-"$KERNEL".* ]]; then
    cp "$STAMPS/kbuild" "$KBUILD_STAMP"
fi

# ---------------------------------------------------------------------------------------------
# Step 1: which QEMU? (decided first, because it decides whether mmdebstrap is needed)
# ---------------------------------------------------------------------------------------------

# A system QEMU found on PATH, skipping our own wrapper directory (else we would wrap ourselves).
SYSTEM_QEMU=
find_system_qemu() {
    local dir q ver
    local IFS=:
    for dir in $PATH; do
        [[ -n $dir && $dir != "$BIN" ]] || continue
        q=$dir/qemu-system-x86_64
        [[ -x $q && ! -d $q ]] || continue
        [[ $(readlink -f "$q") != "$(readlink -f "$WRAPPER" 2>/dev/null)" ]] || continue
        ver=$(qemu_version_of "$q")
        if [[ -n $ver ]] && version_at_least "$ver" "$QEMU_MIN_MAJOR" "$QEMU_MIN_MINOR" && qemu_has_vfio_user "$q"; then
            SYSTEM_QEMU=$q
            log "using system QEMU $q ($ver, has vfio-user-pci)"
            return 0
        fi
        log "ignoring system QEMU $q (${ver:-unknown version}; need >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR with vfio-user-pci)"
        return 1
    done
    return 1
}
find_system_qemu || true
# The trixie root is always needed: it holds the kernel module toolchain (step 6), and QEMU too
# unless the system has a suitable one. Its stamp holds the root's QEMU version, or "none" for a
# root built without QEMU (because a system QEMU was used then); such a root is rebuilt with QEMU
# if that system QEMU is gone.
NEED_ROOT_BUILD=0
if [[ ! -f $STAMPS/trixie-root ]]; then
    NEED_ROOT_BUILD=1
elif [[ -z $SYSTEM_QEMU && $(cat "$STAMPS/trixie-root") == none ]]; then
    log "the trixie root has no QEMU and there is no suitable system QEMU: rebuilding it with QEMU"
    NEED_ROOT_BUILD=1
fi

# ---------------------------------------------------------------------------------------------
# Step 2: host tools. Only what a missing step needs; apt-get update only if something is missing.
# ---------------------------------------------------------------------------------------------

need_download=0
guest_ready || need_download=1
((NEED_ROOT_BUILD)) && need_download=1
kbuild_ready || need_download=1   # may re-download an outdated guest kernel (step 6)

missing_pkgs=()
need_tool() { command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2"); }
need_tool cpio cpio                # initramfs (newc) for the accel probe, and for the lab's guest
if ((need_download)); then
    need_tool apt-get apt          # downloads trixie packages through a private apt state
    need_tool dpkg-deb dpkg        # unpacks them without running maintainer scripts
    need_tool depmod kmod          # the kernel .deb ships no modules.dep; postinst would make it
    need_tool file file            # check busybox is really static
    [[ -f $KEYRING_TRIXIE_PART ]] || missing_pkgs+=(debian-archive-keyring)  # need trixie keys
fi
((NEED_ROOT_BUILD)) && need_tool mmdebstrap mmdebstrap

if ((${#missing_pkgs[@]})); then
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    if ! is_root; then
        die "missing host packages: ${missing_pkgs[*]} (run: sudo apt-get install ${missing_pkgs[*]})"
    fi
    log "installing host packages: ${missing_pkgs[*]}"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing_pkgs[@]}" >&2
    if ((need_download)) && [[ ! -f $KEYRING_TRIXIE_PART ]]; then
        die "the host's debian-archive-keyring has no trixie keys ($KEYRING_TRIXIE_PART);" \
            "install debian-archive-keyring >= 2023.3+deb12u1 (bookworm point release)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# Step 3: a private apt view of trixie + trixie-backports, for downloading .debs as any user.
# It uses the host's apt binary but its own sources, lists, cache and (empty) preferences, so the
# host's apt state is never touched. Only proxy/validity settings are carried over from the host.
# ---------------------------------------------------------------------------------------------

MIRROR=
APT_UPDATED=0
tapt() { APT_CONFIG=$APTDIR/apt.conf "$@"; }
apt_view_update() {
    ((APT_UPDATED)) && return 0
    MIRROR=${MIRROR:-$(detect_mirror)}
    log "apt view: $SUITE + $BACKPORTS from $MIRROR"
    mkdir -p "$APTDIR"/{sources.list.d,preferences.d,conf.d,state/lists/partial,cache/archives/partial}
    : >"$APTDIR/state/status"
    cat >"$APTDIR/sources.list.d/trixie.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $BACKPORTS
Components: main
Architectures: amd64
Signed-By: $KEYRING
EOF
    # Keep the host's proxy and Valid-Until/Date policy (a frozen mirror needs them), nothing else:
    # the host's apt.conf.d also adds DEP-11/Contents targets and dpkg hooks we don't want.
    apt-config dump 2>/dev/null \
        | grep -E '^Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date) ' >"$APTDIR/host-acquire.conf" || true
    {
        echo "Dir::Etc::Parts \"$APTDIR/conf.d\";"
        echo "Dir::Etc::SourceList \"$APTDIR/sources.list\";"
        echo "Dir::Etc::SourceParts \"$APTDIR/sources.list.d\";"
        echo "Dir::Etc::Preferences \"$APTDIR/preferences\";"
        echo "Dir::Etc::PreferencesParts \"$APTDIR/preferences.d\";"
        echo "Dir::State \"$APTDIR/state\";"
        echo "Dir::State::status \"$APTDIR/state/status\";"
        echo "Dir::Cache \"$APTDIR/cache\";"
        echo "Acquire::Languages \"none\";"
        echo "APT::Architecture \"amd64\";"
        echo "APT::Default-Release \"\";"
        # As root apt drops to _apt for downloads, which cannot write into $HOME/.cache.
        is_root && echo "APT::Sandbox::User \"root\";"
        cat "$APTDIR/host-acquire.conf"
    } >"$APTDIR/apt.conf"
    touch "$APTDIR/sources.list"
    tapt apt-get -q update >&2 || die "apt-get update of the $SUITE view failed (mirror $MIRROR, keyring $KEYRING)"
    APT_UPDATED=1
}

# Download PKG=VERSION into DIR.
apt_download() { (cd "$2" && tapt apt-get -q download "$1" >&2); }

# ---------------------------------------------------------------------------------------------
# Step 4: the QEMU itself + the wrapper $CACHE/bin/qemu-system-x86_64
# ---------------------------------------------------------------------------------------------

# The rootless invocation of the trixie root's QEMU: the root's own ld.so with the root's
# libraries (no chroot, no root privileges), and its data dirs: QEMU's compiled-in paths point at
# /usr/share/..., i.e. the host's, so -L names QEMU's blobs (usr/share/qemu: option ROMs, keymaps,
# linuxboot) and SeaBIOS (usr/share/seabios: bios-256k.bin, vgabios-*) inside the root.
root_qemu_cmd() {
    local r=$1
    printf '%s\n' "$r/usr/lib64/ld-linux-x86-64.so.2" --library-path \
        "$r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu" "$r/usr/bin/qemu-system-x86_64" \
        -L "$r/usr/share/qemu" -L "$r/usr/share/seabios"
}

# build_trixie_root WITH_QEMU (1 or 0): a fresh root, with QEMU from backports or without.
build_trixie_root() {
    local with_qemu=$1 new=$ROOT.new acq
    local -a hooks=()
    rm -rf "$new" "$ROOT"   # a root without its stamp is incomplete: start over
    rm -f "$STAMPS/trixie-root" "$KBUILD_STAMP"
    MIRROR=${MIRROR:-$(detect_mirror)}
    if ((with_qemu)); then
        log "building $SUITE root with QEMU from $BACKPORTS (mmdebstrap, mirror $MIRROR) — ~1 min, ~300 MB"
        # shellcheck disable=SC2016  # "$1" (the root dir) is expanded by mmdebstrap's hook shell
        hooks+=(--customize-hook='chroot "$1" apt-get -y -q -t '"$BACKPORTS"' install qemu-system-x86')
    else
        log "building $SUITE root without QEMU (system QEMU $SYSTEM_QEMU is used), for the kernel module toolchain (mmdebstrap, mirror $MIRROR)"
    fi
    acq=$(mktempdir)/host-acquire.conf
    apt-config dump 2>/dev/null \
        | grep -E '^Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date) ' >"$acq" || true
    # --variant=apt: a minimal root with apt, so the same root can later install
    # linux-headers/gcc for building guest modules. QEMU comes from backports, which is
    # NotAutomatic, hence the explicit `-t` in a customize hook. Recommends are skipped
    # (they pull in GUI/audio stacks); seabios and ipxe-qemu are hard dependencies anyway.
    # shellcheck disable=SC2016  # "$1" (the root dir) is expanded by mmdebstrap's hook shell
    mmdebstrap --variant=apt --components=main --keyring="$KEYRING" \
        --aptopt="$acq" --aptopt='Acquire::Languages "none"' \
        --aptopt='APT::Install-Recommends "false"' \
        --aptopt='APT::Sandbox::User "root"' \
        "${hooks[@]}" \
        --customize-hook='chroot "$1" apt-get clean' \
        "$SUITE" "$new" \
        "deb [signed-by=$KEYRING] $MIRROR $SUITE main" \
        "deb [signed-by=$KEYRING] $MIRROR $BACKPORTS main" >&2 \
        || die "mmdebstrap failed"
    local ver=none
    if ((with_qemu)); then
        local -a cmd
        mapfile -t cmd < <(root_qemu_cmd "$new")
        ver=$(qemu_version_of "${cmd[@]}")
        [[ $ver == 11.* ]] || die "trixie root QEMU reports version '${ver:-?}', expected 11.x"
        qemu_has_vfio_user "${cmd[@]}" || die "trixie root QEMU $ver lacks vfio-user-pci"
    fi
    mv "$new" "$ROOT"
    echo "$ver" >"$STAMPS/trixie-root"
    if ((with_qemu)); then log "trixie root ready: QEMU $ver with vfio-user-pci"; else log "trixie root ready (no QEMU)"; fi
}

write_wrapper() {
    local tmp=$WRAPPER.tmp body
    if [[ -n $SYSTEM_QEMU ]]; then
        body="exec $(printf '%q' "$SYSTEM_QEMU") \"\$@\""
    else
        local -a cmd
        mapfile -t cmd < <(root_qemu_cmd "$ROOT")
        # QEMU_MODULE_DIR: QEMU loads optional modules (display/audio/block) from a built-in
        # absolute path; point it into the root too.
        body="QEMU_MODULE_DIR=$(printf '%q' "$ROOT/usr/lib/x86_64-linux-gnu/qemu")
export QEMU_MODULE_DIR
exec$(printf ' %q' "${cmd[@]}") \"\$@\""
    fi
    printf '#!/bin/sh\n# Generated by pcisim qemu-scripts/provision.sh; do not edit.\n%s\n' "$body" >"$tmp"
    chmod 755 "$tmp"
    if cmp -s "$tmp" "$WRAPPER"; then rm -f "$tmp"; else mv "$tmp" "$WRAPPER"; log "wrote $WRAPPER"; fi
}

if ((NEED_ROOT_BUILD)); then
    if [[ -n $SYSTEM_QEMU ]]; then build_trixie_root 0; else build_trixie_root 1; fi
fi
write_wrapper
QEMU_VERSION=$(qemu_version_of "$WRAPPER")
[[ -n $QEMU_VERSION ]] || die "$WRAPPER does not run"
qemu_has_vfio_user "$WRAPPER" || die "$WRAPPER ($QEMU_VERSION) lacks vfio-user-pci"

# ---------------------------------------------------------------------------------------------
# Step 5: guest kernel + modules, busybox
# ---------------------------------------------------------------------------------------------

# Newest "linux-image-<VER>...-amd64" (the generic flavour: not cloud/rt, not -unsigned/-dbg)
# that SUITE itself carries. Prints "PACKAGE VERSION".
newest_kernel_pkg() {
    local ver=$1 suite=$2 re p best_p='' best_v='' v
    re="^linux-image-${ver//./\\.}(\\.[0-9]+)*(-[0-9]+)?(\\+[a-z0-9.~]+)?-amd64\$"
    while read -r p; do
        # madison: " pkg | version | URI suite/main amd64 Packages"
        while read -r v; do
            if [[ -z $best_v ]] || dpkg --compare-versions "$v" gt "$best_v"; then best_p=$p best_v=$v; fi
        done < <(tapt apt-cache madison "$p" | awk -F'|' -v s="$suite/main" \
                    '{ gsub(/ /, "", $2); n = split($3, a, " "); if (a[2] == s) print $2 }')
    done < <(tapt apt-cache pkgnames linux-image- | grep -E "$re" | sort -u)
    [[ -n $best_p ]] || return 1
    echo "$best_p $best_v"
}

provision_kernel() {
    local suite pkg ver tmp kver moddir
    suite=$(kernel_suite "$KERNEL")
    apt_view_update
    read -r pkg ver < <(newest_kernel_pkg "$KERNEL" "$suite") \
        || die "no linux-image-$KERNEL.*-amd64 in $suite"
    log "guest kernel: $pkg $ver ($suite)"
    tmp=$(mktempdir)
    # 6.12's linux-image-<kver> holds everything; newer Debian kernels (7.x in backports) split it:
    # the image package is empty and depends on linux-binary-<kver> (vmlinuz), linux-modules-<kver>
    # and linux-base-<kver> (config, System.map, modules.builtin), all in usr/lib/modules/<kver>/.
    local -a parts=("$pkg=$ver")
    local dep
    while read -r dep; do parts+=("$dep=$ver"); done < <(
        tapt apt-cache show --no-all-versions "$pkg=$ver" | sed -n 's/^Depends: //p' | head -n1 \
            | tr ',|' '\n\n' | sed 's/^ *//; s/ .*//' | grep -E '^linux-(binary|modules|base)-[0-9]' | sort -u)
    log "packages: ${parts[*]}"
    for dep in "${parts[@]}"; do apt_download "$dep" "$tmp"; done
    # dpkg-deb -x: just the files; no maintainer scripts, so no initramfs-tools/hooks run.
    local deb
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
    local vmlinuz
    vmlinuz=$( { find "$tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*'; find "$tmp/x/usr/lib/modules" -mindepth 2 -maxdepth 2 -name vmlinuz; } 2>/dev/null | head -n1)
    [[ -n $vmlinuz ]] || die "$pkg has no boot/vmlinuz-* nor usr/lib/modules/<kver>/vmlinuz"
    if [[ $vmlinuz == */vmlinuz ]]; then kver=$(basename "$(dirname "$vmlinuz")"); else kver=${vmlinuz##*/vmlinuz-}; fi
    mkdir -p "$tmp/out"
    mv "$vmlinuz" "$tmp/out/vmlinuz"
    # trixie ships modules in usr/lib/modules (merged /usr); older packages in lib/modules.
    for moddir in "$tmp/x/usr/lib/modules/$kver" "$tmp/x/lib/modules/$kver" ""; do
        [[ -z $moddir || -d $moddir ]] && break
    done
    [[ -n $moddir ]] || die "$pkg has no modules directory for $kver"
    # The package ships no modules.dep (its postinst runs depmod). depmod -b wants BASE/lib/modules.
    mkdir -p "$tmp/stage/lib/modules"
    mv "$moddir" "$tmp/stage/lib/modules/$kver"
    depmod -b "$tmp/stage" "$kver" || die "depmod failed for $kver"
    [[ -s $tmp/stage/lib/modules/$kver/modules.dep ]] || die "depmod produced an empty modules.dep"
    for f in config System.map; do
        if [[ -f $tmp/x/boot/$f-$kver ]]; then mv "$tmp/x/boot/$f-$kver" "$tmp/out/$f"
        elif [[ -f $tmp/stage/lib/modules/$kver/$f ]]; then mv "$tmp/stage/lib/modules/$kver/$f" "$tmp/out/$f"
        fi
    done
    [[ -f $tmp/out/config ]] || die "$pkg ships no config-$kver (the lab checks the kernel's options in it)"
    mv "$tmp/stage/lib/modules/$kver" "$tmp/out/modules"
    echo "$pkg $ver" >"$tmp/out/package"
    echo "$kver" >"$tmp/out/kver"   # written last inside the staging dir: kver is the stamp
    rm -rf "$KDIR"
    mkdir -p "$GUEST"
    mv "$tmp/out" "$KDIR"
    log "guest kernel $kver -> $KDIR"
}

provision_busybox() {
    local tmp bb
    apt_view_update
    tmp=$(mktempdir)
    apt_download "busybox-static/$SUITE" "$tmp"
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/x"
    for bb in "$tmp/x/usr/bin/busybox" "$tmp/x/bin/busybox" ""; do
        [[ -z $bb || -f $bb ]] && break
    done
    [[ -n $bb ]] || die "busybox-static has no usr/bin/busybox"
    file -L "$bb" | grep -q 'statically linked' || die "$bb is not statically linked: $(file -L "$bb")"
    "$bb" true || die "$bb does not run"
    mkdir -p "$GUEST"
    install -m 755 "$bb" "$BUSYBOX.tmp"
    mv "$BUSYBOX.tmp" "$BUSYBOX"
    log "busybox $("$BUSYBOX" | head -n1 | awk '{print $2}') -> $BUSYBOX"
}

[[ -s $KDIR/kver && -f $KDIR/vmlinuz && -f $KDIR/modules/modules.dep ]] || provision_kernel
[[ -x $BUSYBOX ]] || provision_busybox

# ---------------------------------------------------------------------------------------------
# Step 6: the guest kernel module toolchain, inside the trixie root: the guest kernel's exact
# linux-headers-<kver> (+ its -common headers and linux-kbuild tools, same version), the gcc it
# depends on (the one that built the kernel), make, and perl (kbuild's W=1 runs kernel-doc). The
# lab compiles guest-tests/kmod/ chrooted into the root with them (crates/lab/src/vm/kmod.rs).
#
# The compiler and tools are ordinary apt installs (apt-get chrooted into the root). The three
# kernel packages are unpacked with dpkg-deb -x instead: linux-headers-<kver> depends on the
# kernel image package itself, whose installation would pull in initramfs-tools, udev and
# systemd and run their maintainer scripts in the root, for files we already have (step 5). So
# dpkg does not know the headers. Their paths are versioned (/usr/src/linux-headers-<kver>, ...),
# so several kernels' headers live side by side; when a series' kernel is updated, only that
# series' previous headers are removed (the paths recorded at unpacking, $KBUILD_STAMP.paths).
# ---------------------------------------------------------------------------------------------

# Run a command chrooted into the root with a clean environment.
rchroot() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}
# apt-get in the root. Sandbox::User root: the root's _apt user cannot write the cache dirs as
# created from outside; Use-Pty=0: there is no /dev/pts in the chroot.
rapt() { rchroot apt-get -q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 "$@"; }
# Whether the root's apt knows PACKAGE at exactly VERSION.
rapt_has() {
    rchroot apt-cache madison "$1" 2>/dev/null \
        | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$2"
}
# The Depends of PACKAGE=VERSION, one item a line ("a (>= 1) | b" stays one item).
rapt_depends() {
    rchroot apt-cache show --no-all-versions "$1=$2" | sed -n 's/^Depends: //p' | head -n1 \
        | tr ',' '\n' | sed 's/^ *//; s/ *$//' | grep -v '^$' || true
}
# shellcheck disable=SC2016  # a dpkg-query format, not a shell expression
rdpkg_installed() { [[ $(rchroot dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii " ]]; }

# Drop the apt indexes and downloaded .debs from the root (~100 MB); every use updates first.
root_apt_cleanup() {
    rapt clean >&2 || true
    find "$ROOT/var/lib/apt/lists" -mindepth 1 -maxdepth 1 -type f ! -name lock -delete 2>/dev/null || true
    rm -rf "$ROOT/var/lib/apt/lists/partial/"* 2>/dev/null || true
}

# The top-level paths a kernel header/kbuild package owns in the root (relative, one a line):
# the versioned directories under usr/src, usr/lib (linux-kbuild-<ver>, modules/<kver>) and
# usr/share/doc/linux-*. What remove_old_kbuild removes when the series' kernel changes.
kbuild_paths() {
    dpkg-deb -c "$1" | awk '{ print $6 }' | sed 's|^\./||; s|/$||' \
        | awk -F/ 'NF >= 3 { p = $1 "/" $2 "/" $3; if (p ~ /^usr\/(src\/linux-|lib\/linux-kbuild-)/) print p }
                   NF >= 4 && (p == "usr/lib/modules" || (p == "usr/share/doc" && $4 ~ /^linux-/)) { print p "/" $4 }' \
        | sort -u
}

# Remove the headers of this series' previous kernel (unless it is KVER itself): the paths
# recorded when they were unpacked, or, for a stamp from before the paths were recorded, the
# directories named after its release.
remove_old_kbuild() {
    local new=$1 old base p
    [[ -s $KBUILD_STAMP ]] || return 0
    old=$(cut -d' ' -f3 "$KBUILD_STAMP")
    [[ -n $old && $old != "$new" ]] || return 0
    log "removing the headers of this series' previous kernel $old"
    if [[ -s $KBUILD_STAMP.paths ]]; then
        while read -r p; do
            [[ -n $p && $p != *..* ]] && rm -rf "${ROOT:?}/$p"
        done <"$KBUILD_STAMP.paths"
    else
        base=${old%-amd64}
        rm -rf "$ROOT/usr/src/linux-headers-$old" "$ROOT/usr/src/linux-headers-$base-common" \
            "$ROOT/usr/lib/linux-kbuild-$base" "$ROOT/usr/src/linux-kbuild-$base" \
            "$ROOT/usr/lib/modules/$old" "$ROOT/usr/share/doc/linux-headers-$old" \
            "$ROOT/usr/share/doc/linux-headers-$base-common" "$ROOT/usr/share/doc/linux-kbuild-$base"
    fi
    rm -f "$KBUILD_STAMP"
}

provision_kbuild() {
    is_root || die "the kernel module toolchain is installed into $ROOT with apt-get chrooted" \
        "into it, which needs root: run this script once as root" \
        "(sudo env PCISIM_CACHE=$CACHE $0${KERNEL:+ --kernel $KERNEL})"
    local pkg ver kver ksuite hdr t0=$SECONDS
    read -r pkg ver <"$KDIR/package"
    kver=$(cat "$KDIR/kver")
    ksuite=$(kernel_suite "$KERNEL")
    hdr=linux-headers-$kver
    log "kernel module toolchain for $kver ($hdr $ver) in $ROOT"
    rapt update >&2 || die "apt-get update in $ROOT failed"
    if ! rapt_has "$hdr" "$ver"; then
        # Debian keeps only the newest kernel of a suite: the cached guest kernel is outdated.
        log "$ksuite no longer has $hdr $ver: re-provisioning the guest kernel (newest of $ksuite)"
        rm -rf "$KDIR"
        provision_kernel
        read -r pkg ver <"$KDIR/package"
        kver=$(cat "$KDIR/kver")
        hdr=linux-headers-$kver
        rapt_has "$hdr" "$ver" || die "the root's apt has no $hdr $ver (the mirror may be mid-sync; retry later)"
    fi

    # What the three kernel packages need. Their own names come from the headers' Depends.
    local -a extract=("$hdr") install=(make perl) seen=()
    local item name cc=
    while read -r item; do
        name=${item%% *}
        name=${name%%:*}
        case $name in
            linux-headers-*-common|linux-kbuild-*) extract+=("$name") ;;
            # The image, its parts (we have them, step 5) and its maintainer helpers.
            linux-image-*|linux-base|linux-base-*|linux-binary-*|linux-modules-*) ;;
            # The kernel's compiler, from trixie (backports kernels are built with trixie's gcc;
            # backports carries no gcc).
            # 7.x headers depend on gcc-N-for-host (which provides x86_64-linux-gnu-gcc-N).
            gcc-[0-9]*) cc=${name%-for-host}; install+=("$name/$SUITE") ;;
            *) install+=("$name") ;;
        esac
    done < <(rapt_depends "$hdr" "$ver")
    [[ ${#extract[@]} -eq 3 ]] || die "unexpected Depends of $hdr $ver: $(rapt_depends "$hdr" "$ver" | paste -sd, -)"
    [[ -n $cc ]] || die "$hdr $ver depends on no gcc-N"
    for item in "${extract[@]:1}"; do
        rapt_has "$item" "$ver" || die "the root's apt has no $item $ver"
        while read -r name; do
            name=${name%% *}
            name=${name%%:*}
            case $name in linux-*) ;; *) install+=("$name") ;; esac
        done < <(rapt_depends "$item" "$ver")
    done
    # Only what is missing: naming an installed library would mark it manual and maybe upgrade it.
    for name in "${install[@]}"; do
        rdpkg_installed "${name%%/*}" || seen+=("$name")
    done
    if ((${#seen[@]})); then
        log "installing in the root: ${seen[*]}"
        # -t backports: the root's QEMU came from backports with its libraries (libelf1t64);
        # their siblings (pahole's libdw1t64) must come from there too, or apt finds no solution.
        rapt -y -t "$BACKPORTS" install --no-install-recommends "${seen[@]}" >&2 \
            || die "apt-get install ${seen[*]} in $ROOT failed"
    fi

    local tmp
    tmp=$(mktemp -d "$ROOT/tmp/pcisim-kbuild.XXXXXX")
    # shellcheck disable=SC2016  # expanded by the chrooted sh
    rchroot sh -c 'cd "$1" && shift && apt-get -q -o APT::Sandbox::User=root download "$@"' sh \
        "${tmp#"$ROOT"}" "${extract[@]/%/=$ver}" >&2 \
        || { rm -rf "$tmp"; die "apt-get download ${extract[*]} ($ver) failed"; }
    # Remove the headers this series' previous kernel left (dpkg does not know them, see above),
    # and only those: other series' headers stay.
    remove_old_kbuild "$kver"
    local deb paths=$KBUILD_STAMP.paths
    : >"$paths.tmp"
    for deb in "$tmp"/*.deb; do
        kbuild_paths "$deb" >>"$paths.tmp" || { rm -rf "$tmp"; die "dpkg-deb -c ${deb##*/} failed"; }
        rchroot dpkg-deb -x "${deb#"$ROOT"}" / || { rm -rf "$tmp"; die "dpkg-deb -x ${deb##*/} failed"; }
    done
    sort -u "$paths.tmp" >"$paths" && rm -f "$paths.tmp"
    rm -rf "$tmp"
    root_apt_cleanup

    local h=$ROOT/usr/src/linux-headers-$kver
    [[ -f $h/Makefile && -f $h/Module.symvers && -f $h/.config ]] || die "$hdr unpacked, but $h is incomplete"
    rchroot make --version >/dev/null || die "make does not run in $ROOT"
    rchroot "$cc" --version >/dev/null || die "$cc does not run in $ROOT"
    kbuild_id >"$KBUILD_STAMP"
    log "kernel module toolchain ready in $((SECONDS - t0)) s: $(rchroot "$cc" --version | head -n1), headers $(kheaders) (inside $ROOT)"
}

kbuild_ready || provision_kbuild

# Step 6b: guest userland for kernel work, copied into the initramfs from the root with its
# shared libraries (crates/lab/src/vm/initramfs/): bash is in the root already; pciutils brings
# lspci, setpci and pci.ids.
USERLAND_PKGS=(pciutils pci.ids)
provision_userland() {
    local missing=("${USERLAND_PKGS[@]}")
    # By the files (no chroot: any user can check).
    [[ -x $ROOT/usr/bin/lspci && -x $ROOT/usr/bin/setpci && -f $ROOT/usr/share/misc/pci.ids ]] && return 0
    is_root || die "the guest userland (${missing[*]}) is installed into $ROOT with apt-get" \
        "chrooted into it, which needs root: run this script once as root" \
        "(sudo env PCISIM_CACHE=$CACHE $0${KERNEL:+ --kernel $KERNEL})"
    log "guest userland: installing ${missing[*]} in $ROOT"
    rapt update >&2 || die "apt-get update in $ROOT failed"
    rapt -y install --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} in $ROOT failed"
    root_apt_cleanup
}
provision_userland
# The package lists are only needed while downloading, and every run that downloads refreshes
# them first: don't keep ~150 MB of indexes around.
if ((APT_UPDATED)); then rm -rf "$APTDIR/state/lists" "$APTDIR/cache"; fi

# ---------------------------------------------------------------------------------------------
# Step 7: accelerator. /dev/kvm existing is not enough (PVM, the nested KVM of our machines,
# emulates the guest kernel and dies on its first VEX instruction), so ask the fast kvm-ioctls
# probe (`pcisim lab kvm-probe`, ~10 ms; see docs/lab.md) first, and boot a tiny initramfs under
# KVM only when it says KVM is usable (the boot confirms it). Cached per host boot.
# ---------------------------------------------------------------------------------------------

# kvm_fast_verdict: prints "usable" or "unusable: REASON" from the kvm-ioctls probe, or fails
# when there is no probe to ask. The lab runs the probe itself and passes its verdict in
# $PCISIM_KVM_VERDICT; by hand, a pcisim binary ($PCISIM_BIN, else on PATH, else the
# repository's target/{release,debug}) is asked.
kvm_fast_verdict() {
    if [[ -n ${PCISIM_KVM_VERDICT:-} ]]; then
        printf '%s\n' "$PCISIM_KVM_VERDICT"
        return 0
    fi
    local bin="" c out rc=0 repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    for c in "${PCISIM_BIN:-}" "$(command -v pcisim || true)" "$repo/target/release/pcisim" \
        "$repo/target/debug/pcisim"; do
        if [[ -n $c && -x $c ]]; then bin=$c; break; fi
    done
    [[ -n $bin ]] || return 1
    out=$("$bin" lab kvm-probe 2>>"$LOGS/accel-kvm-probe.log") || rc=$?
    case $rc in
        0) echo usable ;;
        1) printf 'unusable: %s\n' "${out#kvm: unusable: }" ;;
        *) return 1 ;;
    esac
}

# Build the probe initramfs: just busybox and an /init. /dev/console comes from the kernel's
# built-in default initramfs, so no device nodes (and no root) are needed here.
make_probe_initramfs() {
    local out=$1 d
    d=$(mktempdir)
    mkdir -p "$d/bin" "$d/proc" "$d/sys" "$d/dev"
    cp "$BUSYBOX" "$d/bin/busybox"
    cat >"$d/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "$ACCEL_MARKER \$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
EOF
    chmod 755 "$d/init"
    (cd "$d" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
}

# boot_probe ACCEL CPU LOG: 0 if the guest printed the marker. Sets PROBE_SECONDS.
# Polls so that a KVM internal error (QEMU then just pauses the VM) is caught at once.
PROBE_SECONDS=
boot_probe() {
    local accel=$1 cpu=$2 logf=$3 t0 t1
    t0=$(date +%s%N)
    "$WRAPPER" -machine q35 -accel "$accel" -cpu "$cpu" -m 512M -smp 1 \
        -nodefaults -display none -serial stdio -no-reboot \
        -kernel "$KDIR/vmlinuz" -initrd "$CACHE/probe-initramfs.cpio" \
        -append "console=ttyS0 panic=-1" </dev/null >"$logf" 2>&1 &
    CHILD_PID=$!
    local deadline=$((SECONDS + ACCEL_TIMEOUT))
    while kill -0 "$CHILD_PID" 2>/dev/null; do
        if grep -aq 'KVM internal error' "$logf" || ((SECONDS >= deadline)); then
            kill "$CHILD_PID" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    wait "$CHILD_PID" 2>/dev/null || true
    CHILD_PID=
    t1=$(date +%s%N)
    PROBE_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    grep -aq "^$ACCEL_MARKER" "$logf"
}

detect_accel() {
    local accel=tcg cpu=max kvm_note tcg_s
    make_probe_initramfs "$CACHE/probe-initramfs.cpio"
    log "accel probe: booting $(cat "$KDIR/kver") under TCG (-accel tcg -cpu max)"
    boot_probe tcg max "$LOGS/accel-tcg.log" \
        || die "the guest does not boot even under TCG; see $LOGS/accel-tcg.log"
    tcg_s=$PROBE_SECONDS
    log "TCG boot-to-poweroff: ${tcg_s} s"
    local fast="" probe=boot
    if fast=$(kvm_fast_verdict); then probe=kvm-ioctls; fi
    if ! (exec 3<>/dev/kvm) 2>/dev/null; then
        kvm_note="/dev/kvm not openable"
    elif [[ $fast == unusable* ]]; then
        kvm_note="broken (kvm-ioctls probe): ${fast#unusable: }"
    else
        [[ -n $fast ]] && log "kvm-ioctls probe: $fast"
        log "accel probe: booting under KVM (-accel kvm -cpu host, timeout ${ACCEL_TIMEOUT}s)"
        if boot_probe kvm host "$LOGS/accel-kvm.log"; then
            accel=kvm cpu=host kvm_note="works (boot-to-poweroff ${PROBE_SECONDS} s)"
        elif grep -aq 'KVM internal error' "$LOGS/accel-kvm.log"; then
            kvm_note="broken: $(grep -a -m1 'KVM internal error' "$LOGS/accel-kvm.log" | tr -d '\r')"
        else
            kvm_note="no marker after ${PROBE_SECONDS} s (see $LOGS/accel-kvm.log)"
        fi
    fi
    log "KVM: $kvm_note -> using $accel"
    cat >"$ACCEL_FILE.tmp" <<EOF
boot_id=$(boot_id)
accel=$accel
cpu=$cpu
tcg_boot_seconds=$tcg_s
kvm=$kvm_note
kvm_probe=$probe
qemu=$QEMU_VERSION
kver=$(cat "$KDIR/kver")
EOF
    mv "$ACCEL_FILE.tmp" "$ACCEL_FILE"
}

if accel_cached >/dev/null; then
    log "accel (cached for this boot): $(accel_get accel), TCG boot $(accel_get tcg_boot_seconds) s, KVM $(accel_get kvm)"
else
    detect_accel
fi

emit_env
