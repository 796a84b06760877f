#!/usr/bin/env bash
# Set up everything portguard needs on a Debian/Ubuntu machine (idempotent), then run a task:
#   ./dev.sh demo   apply the embedded default policy in a sandbox, show it working, remove it
#   ./dev.sh test   the whole test suite: unit tests and kernel tests (needs root)
#   ./dev.sh setup  only the set-up
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(clang libbpf-dev libbpf1 bpftool iproute2 util-linux python3-venv gcc)

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

case "${1:-}" in
  setup) setup ;;
  demo) setup; exec .venv/bin/portguard demo ;;
  test) setup; shift; exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
