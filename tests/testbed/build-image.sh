#!/usr/bin/env bash
# Build the qemu testbed's kernel and base initramfs into the cache (tests/testbed/cache/).
#
#   bash tests/testbed/build-image.sh [--refresh]
#
# Kernel: Debian trixie's stock linux-image-*-amd64-unsigned (rdma_rxe, udmabuf, dma-heaps).
# User space: busybox-static and the rdma-core tools from this machine's own Debian suite, so
# host-built (glibc, dynamically linked) project binaries run in the guest unchanged.
#
# Everything is downloaded with `apt-get download` through a private apt configuration under the
# cache: its source lists are derived from this machine's own Debian sources at run time (no
# mirror address lives in the repository) and this machine's apt state is never touched.
#
# Each stage leaves a stamp file; a stage whose stamp (and inputs) are unchanged is skipped.
# --refresh re-reads the package indexes (new kernel point release, security updates).
#
# Outputs: cache/vmlinuz, cache/initrd.gz (padded to 512 bytes so that run.sh can append a
# second, uncompressed cpio archive), cache/kernel-version.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${TESTBED_CACHE:-$here/cache}"
REFRESH=0
for a in "$@"; do
  case "$a" in
    --refresh) REFRESH=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

# Kernel modules to load, in this order (their dependencies are resolved and loaded first).
# crc32_generic must precede rdma_rxe: rxe asks the crypto API for "crc32" and nothing
# auto-loads the module in a udev-less initramfs (rxe then fails with ENOENT).
# scsi_debug (with sd_mod for its /dev/sda) is a disk in RAM whose medium errors can be switched
# on: the storage tests' real EIO.
MODULES=(virtio_pci virtio_net crc32_generic ib_core ib_uverbs rdma_rxe rdma_ucm udmabuf scsi_mod sd_mod scsi_debug)
# Guest user space, from this machine's own suite. Only the `rdma` tool is taken from iproute2.
USER_PKGS=(busybox-static libc6 libgcc-s1 libibverbs1 ibverbs-providers ibverbs-utils
  rdmacm-utils librdmacm1 libnl-3-200 libnl-route-3-200 iproute2 libmnl0 libbsd0 libmd0 libcap2)
KERNEL_SUITE="${TESTBED_KERNEL_SUITE:-trixie}"

t0=$SECONDS
say() { printf '[build-image %3ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { echo "build-image.sh: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb xz gzip cpio sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is missing on this machine (see tests/testbed/README.md)"
done

mkdir -p "$CACHE"/{stamps,debs/kernel,debs/user,apt}
STAMPS="$CACHE/stamps"
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { printf '%s\n' "$2" >"$STAMPS/$1"; }

# ---------------------------------------------------------------------------------------------
# Private apt configurations: one for the kernel suite, one for this machine's own suites.
# ---------------------------------------------------------------------------------------------
# shellcheck disable=SC1091
. /etc/os-release
OWN_SUITE="${VERSION_CODENAME:-}"
[ -n "$OWN_SUITE" ] || die "cannot tell this machine's Debian suite from /etc/os-release"

# "URI|SUITE|COMPONENT" of every Debian source this machine is configured with.
# shellcheck disable=SC2016 # apt's own $(FIELD) syntax, not a shell expansion
mapfile -t OWN_SOURCES < <(apt-get indextargets --format '$(REPO_URI)|$(RELEASE)|$(COMPONENT)' \
  'Created-By: Packages' 2>/dev/null | sort -u)
[ "${#OWN_SOURCES[@]}" -gt 0 ] || die "no apt sources configured on this machine"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SIGNED=""
[ -f "$KEYRING" ] && SIGNED="[signed-by=$KEYRING] "

apt_setup() { # NAME LINES... : writes cache/apt/NAME/{sources.list,...}
  local name="$1"; shift
  local d="$CACHE/apt/$name"
  mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/parts" "$d/cache"
  printf '%s\n' "$@" >"$d/sources.list.new"
  if ! cmp -s "$d/sources.list.new" "$d/sources.list" 2>/dev/null; then
    mv "$d/sources.list.new" "$d/sources.list"
    rm -f "$STAMPS/apt-$name"
  else
    rm -f "$d/sources.list.new"
  fi
}
apt_opts() { # NAME -> the -o options of that private configuration
  local d="$CACHE/apt/$1"
  printf '%s\n' \
    -o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=$d/parts" \
    -o "Dir::Etc::preferences=/dev/null" -o "Dir::Etc::preferencesparts=$d/parts" \
    -o "Dir::State::lists=$d/lists" -o "Dir::Cache=$d/cache" \
    -o "Dir::Cache::archives=$d/archives" -o "APT::Architecture=amd64" \
    -o "Acquire::Languages=none" -o "APT::Sandbox::User=$(id -un)"
}

kernel_lines=()
user_lines=()
for s in "${OWN_SOURCES[@]}"; do
  IFS='|' read -r uri suite comp <<<"$s"
  user_lines+=("deb ${SIGNED}$uri $suite $comp")
  # The main archive of this machine's own suite, with the suite changed to the kernel's.
  if [ "$suite" = "$OWN_SUITE" ] && [ "$comp" = main ]; then
    kernel_lines+=("deb ${SIGNED}$uri $KERNEL_SUITE main")
  fi
done
[ "${#kernel_lines[@]}" -gt 0 ] || die "no '$OWN_SUITE main' source on this machine to derive the $KERNEL_SUITE source from"
apt_setup kernel "${kernel_lines[@]}"
apt_setup user "${user_lines[@]}"

apt_update() { # NAME
  if [ "$REFRESH" = 1 ] || ! [ -f "$STAMPS/apt-$1" ]; then
    say "apt: reading the $1 package indexes"
    mapfile -t o < <(apt_opts "$1")
    apt-get "${o[@]}" -qq update || die "apt-get update failed for the private '$1' configuration ($CACHE/apt/$1/sources.list)"
    date -u +%FT%TZ >"$STAMPS/apt-$1"
    rm -f "$STAMPS/download-$1"
  fi
}
apt_update kernel
apt_update user

mapfile -t KOPT < <(apt_opts kernel)
mapfile -t UOPT < <(apt_opts user)

# ---------------------------------------------------------------------------------------------
# Downloads.
# ---------------------------------------------------------------------------------------------
KPKG="${TESTBED_KERNEL_PKG:-}"
if [ -z "$KPKG" ]; then
  # linux-image-amd64 depends on the current linux-image-<version>-amd64; take its -unsigned twin.
  signed="$(apt-cache "${KOPT[@]}" depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)"
  [ -n "$signed" ] || die "cannot find linux-image-amd64 in $KERNEL_SUITE (see $CACHE/apt/kernel/sources.list)"
  KPKG="$signed-unsigned"
fi
apt-cache "${KOPT[@]}" show "$KPKG" >/dev/null 2>&1 || die "package $KPKG is not in $KERNEL_SUITE"

download() { # NAME DIR PACKAGES...
  local name="$1" dir="$2"; shift 2
  local key; key="$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  if stamp_ok "download-$name" "$key"; then
    say "download $name: cached"
    return
  fi
  say "download $name: $*"
  local -a o
  if [ "$name" = kernel ]; then o=("${KOPT[@]}"); else o=("${UOPT[@]}"); fi
  rm -f "$dir"/*.deb
  (cd "$dir" && apt-get "${o[@]}" -qq download "$@") || die "apt-get download failed for: $*"
  stamp_set "download-$name" "$key"
}
download kernel "$CACHE/debs/kernel" "$KPKG"
download user "$CACHE/debs/user" "${USER_PKGS[@]}"

# ---------------------------------------------------------------------------------------------
# Kernel and modules.
# ---------------------------------------------------------------------------------------------
kdeb="$(ls "$CACHE"/debs/kernel/*.deb)"
kkey="$(basename "$kdeb")|${MODULES[*]}"
if stamp_ok kernel "$kkey" && [ -f "$CACHE/vmlinuz" ] && [ -d "$CACHE/modules" ]; then
  say "kernel: cached ($(cat "$CACHE/kernel-version"))"
else
  say "kernel: extracting $(basename "$kdeb")"
  tmp="$CACHE/work-kernel"
  rm -rf "$tmp" "$CACHE/modules"
  mkdir -p "$tmp" "$CACHE/modules"
  dpkg-deb -x "$kdeb" "$tmp"
  vmlinuz="$(find "$tmp/boot" -name 'vmlinuz-*' | head -n1)"
  [ -n "$vmlinuz" ] || die "no vmlinuz in $kdeb"
  kver="${vmlinuz##*/vmlinuz-}"
  mdir="$(find "$tmp" -type d -path "*/modules/$kver" | head -n1)"
  [ -n "$mdir" ] || die "no modules/$kver in $kdeb"

  # name -> file, with '-' and '_' equivalent as modprobe treats them.
  declare -A modfile=()
  while IFS= read -r f; do
    n="${f##*/}"; n="${n%%.ko*}"; n="${n//-/_}"
    modfile[$n]="$f"
  done < <(find "$mdir/kernel" -name '*.ko*')
  builtin_list="$(sed 's#.*/##; s#\.ko$##; s#-#_#g' "$mdir/modules.builtin" 2>/dev/null || true)"

  declare -A done_mod=()
  order=()
  kodir="$CACHE/modules"
  resolve() { # NAME: add NAME's dependencies, then NAME, to the load order
    local m="${1//-/_}"
    [ -n "${done_mod[$m]:-}" ] && return 0
    done_mod[$m]=1
    local f="${modfile[$m]:-}"
    if [ -z "$f" ]; then
      if grep -qx "$m" <<<"$builtin_list"; then return 0; fi
      # A bool option (udmabuf) is built in without a modules.builtin entry.
      if grep -qx "CONFIG_${m^^}=y" "$tmp"/boot/config-*; then return 0; fi
      die "module $m is neither in $KPKG nor built in"
    fi
    local ko="$kodir/$m.ko"
    case "$f" in
      *.ko.xz) xz -dc "$f" >"$ko" ;;
      *.ko.gz) gzip -dc "$f" >"$ko" ;;
      *.ko.zst) zstd -qdc "$f" >"$ko" ;;
      *.ko) cp "$f" "$ko" ;;
    esac
    local deps d
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1)"
    for d in ${deps//,/ }; do resolve "$d"; done
    order+=("$m")
  }
  for m in "${MODULES[@]}"; do resolve "$m"; done
  printf '%s\n' "${order[@]}" >"$kodir/load-order"
  cp "$vmlinuz" "$CACHE/vmlinuz"
  echo "$kver" >"$CACHE/kernel-version"
  grep -E '^(# )?CONFIG_(RDMA_RXE|UDMABUF|DMABUF_HEAPS_SYSTEM|DMABUF_MOVE_NOTIFY|PCI_P2PDMA)[= ]' \
    "$tmp"/boot/config-* >"$CACHE/kernel-config" 2>/dev/null || true
  rm -rf "$tmp"
  stamp_set kernel "$kkey"
  rm -f "$STAMPS/initrd"
  say "kernel: $kver; modules in load order: ${order[*]}"
fi

# ---------------------------------------------------------------------------------------------
# Base initramfs: merged-/usr layout, busybox, rdma-core user space, modules, /init.
# ---------------------------------------------------------------------------------------------
ikey="$(cat "$here/guest/init" "$CACHE/modules/load-order" "$0" | sha256sum | cut -c1-16)|$(find "$CACHE/debs/user" -name '*.deb' -printf '%f\n' | sort | sha256sum | cut -c1-16)"
if stamp_ok initrd "$ikey" && [ -f "$CACHE/initrd.gz" ]; then
  say "initramfs: cached ($(du -h "$CACHE/initrd.gz" | cut -f1))"
else
  say "initramfs: assembling"
  root="$CACHE/work-root"
  x="$CACHE/work-extract"
  rm -rf "$root" "$x"
  mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{proc,sys,dev,tmp,run,etc,root,testbed}
  ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"
  ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
  for deb in "$CACHE"/debs/user/*.deb; do
    pkg="$(dpkg-deb -f "$deb" Package)"
    rm -rf "$x"; mkdir -p "$x"
    dpkg-deb -x "$deb" "$x"
    if [ "$pkg" = iproute2 ]; then
      rdma="$(find "$x" -type f -name rdma -perm -u+x | head -n1)"
      [ -n "$rdma" ] || die "no rdma tool in $deb"
      cp -a "$rdma" "$root/usr/sbin/rdma"
      continue
    fi
    rm -rf "${x:?}/usr/share"
    # Fold the top-level /bin, /sbin, /lib, /lib64 of unmerged packages into /usr.
    for top in bin sbin lib lib64; do
      if [ -d "$x/$top" ] && ! [ -L "$x/$top" ]; then
        cp -a "$x/$top/." "$root/usr/$top/"
        rm -rf "${x:?}/$top"
      fi
    done
    cp -a "$x/." "$root/"
  done
  rm -rf "$x"
  [ -x "$root/usr/bin/busybox" ] || die "busybox-static did not provide /bin/busybox"
  ln -sf busybox "$root/usr/bin/sh"
  kver="$(cat "$CACHE/kernel-version")"
  mkdir -p "$root/lib/modules/$kver"
  cp "$CACHE"/modules/*.ko "$CACHE/modules/load-order" "$root/lib/modules/$kver/"
  install -m 0755 "$here/guest/init" "$root/init"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\n' >"$root/etc/group"
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
  # Every shared library the guest's programs need must be present.
  if command -v readelf >/dev/null; then
    missing=""
    while IFS= read -r f; do
      for lib in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        if [ -z "$(find "$root/usr/lib" -name "$lib" -print -quit)" ]; then missing="$missing $lib(${f#"$root"})"; fi
      done
    done < <(find "$root/usr/bin" "$root/usr/sbin" -type f -perm -u+x)
    [ -z "$missing" ] || die "guest programs need libraries no package provided:$missing"
  fi
  (cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 >"$CACHE/initrd.gz.new"
  # Pad to 512 bytes: an appended archive must start 4-byte aligned, and zeros are skipped.
  size=$(stat -c %s "$CACHE/initrd.gz.new")
  pad=$(((512 - size % 512) % 512))
  [ "$pad" = 0 ] || head -c "$pad" /dev/zero >>"$CACHE/initrd.gz.new"
  mv "$CACHE/initrd.gz.new" "$CACHE/initrd.gz"
  rm -rf "$root"
  stamp_set initrd "$ikey"
  say "initramfs: $(du -h "$CACHE/initrd.gz" | cut -f1)"
fi

say "ready: $CACHE/vmlinuz ($(cat "$CACHE/kernel-version")), $CACHE/initrd.gz"
