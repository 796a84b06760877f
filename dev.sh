#!/usr/bin/env bash
# Set up everything portguard needs on a Debian/Ubuntu machine (idempotent), then run a task:
#   ./dev.sh demo   apply the embedded default policy in a sandbox, show it working, remove it
#   ./dev.sh test   the whole test suite: unit tests and kernel tests (needs root)
#   ./dev.sh deb    build the Debian package from this tree into dist/ (portguard_*_all.deb)
#   ./dev.sh setup  only the set-up
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(clang libbpf-dev libbpf1 bpftool iproute2 util-linux python3-venv gcc lintian)

setup() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian's python (not a pyenv one first on PATH): system site packages stay reachable.
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  # Compile the BPF object once into /var/cache/portguard: apply then needs no compiler.
  .venv/bin/portguard build >/dev/null
}

# The Debian package, built from a copy of the files git tracks (or would track) here, so the
# work tree gets no build droppings. PORTGUARD_DEB_VERSION=V builds version V (tests build a
# higher version of the same tree to exercise upgrades).
deb() {
  if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    echo "dev.sh: installing the package's Build-Depends"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./ >/dev/null
  fi
  local tmp out
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  out=${PORTGUARD_DEB_DIR:-$PWD/dist}
  mkdir -p "$tmp/portguard" "$out"
  git ls-files -z -c -o --exclude-standard | xargs -0 cp --parents -t "$tmp/portguard"
  if [ -n "${PORTGUARD_DEB_VERSION:-}" ]; then
    { printf 'portguard (%s) unstable; urgency=medium\n\n  * Test build.\n\n' "$PORTGUARD_DEB_VERSION"
      printf ' -- portguard developers <portguard@example.org>  %s\n\n' "$(date -R)"
      cat "$tmp/portguard/debian/changelog"; } > "$tmp/changelog"
    mv "$tmp/changelog" "$tmp/portguard/debian/changelog"
  fi
  # Debian's own python3 builds it (not a pyenv one first on PATH): the package runs on that.
  (cd "$tmp/portguard" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$tmp/build.log" 2>&1) \
    || { tail -n 40 "$tmp/build.log" >&2; echo "dev.sh: the package build failed" >&2; return 1; }
  cp "$tmp"/portguard_*_all.deb "$out"/
  ls "$out"/portguard_*_all.deb
}

case "${1:-}" in
  setup) setup ;;
  deb) deb ;;
  demo) setup; exec .venv/bin/portguard demo ;;
  test) setup; shift; exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: $0 demo|test|deb|setup" >&2; exit 2 ;;
esac
