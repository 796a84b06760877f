#!/bin/bash
# Provisioning (as root, once per VM), in two steps (the Vagrantfile's provisioners):
#   install.sh UPLOAD tests     the scenario scripts, test units and test policy; no portguard
#   install.sh UPLOAD package   portguard itself: the built .deb, installed with apt
# UPLOAD holds debs/ (install/ and upgrade/ .debs) and guest/, uploaded by the Vagrantfile.
# run-matrix runs the package scenario (install, upgrade, purge on the running system) between
# the two steps.
set -euo pipefail
upload=${1:-/var/tmp/portguard-upload}
step=${2:?usage: install.sh UPLOAD tests|package}
guest=$upload/guest
export DEBIAN_FRONTEND=noninteractive

tests() {
  # Public boxes (debian/bookworm64 …) lack what the local boxes have built in.
  local need=() p
  for p in rpcbind nfs-common iproute2 bpftool; do
    dpkg -s "$p" > /dev/null 2>&1 || need+=("$p")
  done
  if (( ${#need[@]} )); then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  install -d /usr/local/lib/pg-tests /var/lib/pg-tests
  install -m 0755 "$guest/pgtest.py" /usr/local/lib/pg-tests/pgtest.py
  install -m 0644 "$guest"/units/*.service /etc/systemd/system/
  install -d /etc/systemd/system/multi-user.target.wants /etc/systemd/system/pg-owner.service.d
  install -D -m 0644 "$guest/units/pg-rpc.conf" /etc/systemd/system/pg-owner.service.d/rpc.conf
  # A drop-in beside the package's own conffile (which keeps the default policy): an
  # administrator's addition, kept across upgrade and purge, in force from the first apply.
  install -D -m 0644 "$guest/portguard-test.toml" /etc/portguard/conf.d/pg-tests.toml
  systemctl daemon-reload
  systemctl enable -q pg-owner.service pg-resv.service pg-check.service rpcbind.service
  systemctl enable -q rpc-statd.service 2> /dev/null || true
}

package() {
  local debs=("$upload"/debs/install/portguard_*_all.deb)
  # apt resolves the Depends: already in the local boxes, from the mirror on a public box.
  # The package enables portguard.service and applies the guard at once. Exactly this tree's
  # version, also over the higher test version a failed package scenario may have left.
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${debs[0]}"
  systemctl is-enabled -q portguard.service
  echo "portguard $(dpkg-query -W -f='${Version}' portguard) installed"
  portguard status
}

case $step in
  tests) tests ;;
  package) package ;;
  *) echo "unknown step: $step" >&2; exit 2 ;;
esac
