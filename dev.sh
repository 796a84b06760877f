#!/usr/bin/env bash
# Set up everything portguard needs on a Debian/Ubuntu machine (idempotent), then run a task:
#   ./dev.sh demo   apply the embedded default policy in a sandbox, show it working, remove it
#   ./dev.sh test   the whole test suite: unit tests and kernel tests (needs root)
#   ./dev.sh deb    build the Debian package from this tree into dist/ (portguard_*_all.deb)
#   ./dev.sh wheel  the wheel route: the wheel built from this tree in a venv of its own with
#                   what PyPI serves today (click, pyroute2, ...); unit tests and the CLI smoke
#                   test against it (needs root for the latter)
#   ./dev.sh setup  only the set-up
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(clang libbpf-dev libbpf1 bpftool iproute2 util-linux python3-venv gcc lintian)
# What the tests use from Debian: pyroute2 is the oracle of the sock_diag reader (kernel tests).
TEST_PACKAGES=(python3-pyroute2)

# The binary package's Depends in debian/control (python3-click, libbpf1, ...): the development
# venv runs on the same Debian packages as the installed package, never on PyPI's versions.
runtime_depends() {
  sed -n '/^Package: portguard$/,/^$/p' debian/control \
    | sed -n '/^Depends:/,/^[A-Z]/p' | sed '1s/^Depends://; /^[A-Z]/d' \
    | tr ',' '\n' | sed 's/^ *//; s/ .*//; /\$/d; /^$/d'
}

setup() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}" "${TEST_PACKAGES[@]}" $(runtime_depends); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian's python (not a pyenv one first on PATH) with system site packages: click and the
  # other runtime dependencies are Debian's, as for the package. A venv that got its own click
  # (an older dev.sh let pip fetch PyPI's) is made anew.
  if [ -x .venv/bin/python ] && ! .venv/bin/python -c "$DEBIAN_CLICK" 2>/dev/null; then
    echo "dev.sh: .venv has a click of its own, not Debian's: making it anew"
    rm -rf .venv
  fi
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  .venv/bin/python -c "$DEBIAN_CLICK" \
    || { echo "dev.sh: .venv must use Debian's python3-click" >&2; return 1; }
  # Compile the BPF object once into /var/cache/portguard: apply then needs no compiler.
  .venv/bin/portguard build >/dev/null
}

DEBIAN_CLICK='import click, sys; sys.exit(not click.__file__.startswith("/usr/lib/python3/"))'

# The Debian package, built from a copy of the files git tracks (or would track) here, so the
# work tree gets no build droppings. PORTGUARD_DEB_VERSION=V builds version V (tests build a
# higher version of the same tree to exercise upgrades).
deb() {
  if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    echo "dev.sh: installing the package's Build-Depends"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 build-dep -y -qq ./ >/dev/null
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

# The wheel route: what `pip install portguard-*.whl` gives, with what PyPI serves today (click,
# and the test tools: pytest, pyroute2 ...) in a venv without Debian's site packages. The unit
# tests and the CLI smoke test run against it; the smoke test (root) runs the wheel's own
# `portguard` script, the unit tests import this tree's guard beside PyPI's click.
wheel() {
  local venv=.venv-wheel out=dist/wheel whl
  rm -rf "$venv" "$out"
  .venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$out" .
  whl=$(ls "$out"/portguard-*.whl)
  /usr/bin/python3 -m venv "$venv"
  "$venv"/bin/pip install -q --disable-pip-version-check "$whl[test]"
  "$venv"/bin/python -c 'from importlib.metadata import version as v
print("dev.sh: the wheel route with click", v("click"), "and pyroute2", v("pyroute2"))'
  PORTGUARD_PROGRAM=$PWD/$venv/bin/portguard "$venv"/bin/python -m pytest -q -p no:cacheprovider \
    tests/unit tests/kernel/test_cli_smoke.py tests/kernel/test_holders_oracle.py "$@"
}

case "${1:-}" in
  setup) setup ;;
  deb) deb ;;
  wheel) setup; shift; wheel "$@" ;;
  demo) setup; exec .venv/bin/portguard demo ;;
  test) setup; shift; exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: $0 demo|test|deb|wheel|setup" >&2; exit 2 ;;
esac
