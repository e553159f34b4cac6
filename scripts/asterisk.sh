#!/usr/bin/env bash
# Build (once) Asterisk with its bundled PJSIP from the tarballs in ../shared/vendor, install
# it into a cache keyed by the tarball's name and print the install prefix. The lab tests
# (tests/lab) run it unprivileged from that tree: $prefix/usr/sbin/asterisk with
# LD_LIBRARY_PATH=$prefix/usr/lib. Recipe: ../shared/vendor/README.md.
# `asterisk.sh --cached` prints the prefix only if it is built (exit 1 otherwise).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${CALLSCRIBE_SHARED:-$here/../shared}
vendor="$shared/vendor"
tarball=$(cd "$vendor" && ls asterisk-*.tar.xz | sort | tail -n 1)
pjproject=$(cd "$vendor" && ls pjproject-*.tar.bz2 | sort | tail -n 1)
prefix="${CALLSCRIBE_CACHE:-$HOME/.cache/callscribe}/${tarball%.tar.xz}"

if [ -f "$prefix/.complete" ]; then
  echo "$prefix"
  exit 0
fi
if [ "${1:-}" = "--cached" ]; then  # only report: the lab's fixture must not build under a test timeout
  echo "asterisk.sh: $prefix is not built yet; run scripts/asterisk.sh" >&2
  exit 1
fi

# Build dependencies, installed only when one is missing (apt-get needs root or sudo).
deps=(build-essential libedit-dev libjansson-dev libxml2-dev libsqlite3-dev uuid-dev libssl-dev
  pkg-config bzip2 patch xz-utils)
missing=()
for pkg in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "asterisk.sh: installing build dependencies: ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

echo "asterisk.sh: building $tarball with bundled $pjproject into $prefix (several minutes)" >&2
build=$(mktemp -d -t callscribe-asterisk-XXXXXX)
trap 'rm -rf "$build"' EXIT
tar xJf "$vendor/$tarball" -C "$build"
src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n 1)
# The bundled-PJSIP build looks for the tarball (by its upstream name, md5-checked) here and
# fetches nothing when it is present.
mkdir -p "$build/externals"
cp "$vendor/$pjproject" "$build/externals/"
jobs=${ASTERISK_JOBS:-2}
(
  cd "$src"
  ./configure --with-pjproject-bundled --with-externals-cache="$build/externals" --with-jansson \
    >"$build/configure.log" 2>&1 || { tail -n 40 "$build/configure.log" >&2; exit 1; }
  make menuselect.makeopts >/dev/null
  # No sound packages (they would be downloaded) and no STIR/SHAKEN (needs libcurl features).
  menuselect/menuselect --disable-category MENUSELECT_CORE_SOUNDS --disable-category MENUSELECT_MOH \
    --disable-category MENUSELECT_EXTRA_SOUNDS --disable res_stir_shaken menuselect.makeopts >/dev/null
  make -j"$jobs" >"$build/make.log" 2>&1 || { tail -n 60 "$build/make.log" >&2; exit 1; }
  rm -rf "$prefix"
  make install DESTDIR="$prefix" >"$build/install.log" 2>&1 || { tail -n 40 "$build/install.log" >&2; exit 1; }
)
touch "$prefix/.complete"
echo "$prefix"
