#!/bin/bash
# Provisioning (as root, once per VM): install portguard from the uploaded wheels into
# /opt/portguard, build its BPF object once, install its unit and the test units.
set -euo pipefail
upload=${1:-/tmp/portguard-upload}   # holds wheels/ and guest/, uploaded by the Vagrantfile
wheels=$upload/wheels
guest=$upload/guest
export DEBIAN_FRONTEND=noninteractive

# Public boxes (debian/bookworm64 …) lack what the local boxes have built in.
need=()
for p in clang libbpf-dev rpcbind nfs-common python3-venv python3-pip iproute2; do
  dpkg -s "$p" > /dev/null 2>&1 || need+=("$p")
done
if (( ${#need[@]} )); then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Under software emulation `python3 -m venv` with its own pip takes 3.5 minutes (ensurepip
# installs and byte-compiles pip and setuptools); Debian's pip installing into a pip-less venv
# takes 45 s. Modules are byte-compiled on first import instead of all at install time.
rm -rf /opt/portguard
if python3 -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 3))' 2> /dev/null; then
  python3 -m venv --without-pip --system-site-packages /opt/portguard
  python3 -m pip --python /opt/portguard/bin/python install -q --no-compile --no-index \
    --find-links "$wheels" portguard
else
  python3 -m venv --system-site-packages /opt/portguard
  /opt/portguard/bin/pip install -q --no-compile --no-index --find-links "$wheels" portguard
fi
# the unit runs /usr/bin/portguard (a distribution package would put it there)
ln -sf /opt/portguard/bin/portguard /usr/bin/portguard
/opt/portguard/bin/portguard build

install -m 0644 "$wheels/portguard.service" /etc/systemd/system/portguard.service
# the monitor is started by the features scenario only (not enabled)
install -m 0644 "$wheels/portguard-monitor.service" /etc/systemd/system/portguard-monitor.service
install -d /usr/local/lib/pg-tests /var/lib/pg-tests
install -m 0755 "$guest/pgtest.py" /usr/local/lib/pg-tests/pgtest.py
install -m 0644 "$guest"/units/*.service /etc/systemd/system/
install -d /etc/systemd/system/multi-user.target.wants /etc/systemd/system/pg-owner.service.d
install -D -m 0644 "$guest/units/pg-rpc.conf" /etc/systemd/system/pg-owner.service.d/rpc.conf
install -D -m 0644 "$guest/portguard-test.toml" /etc/portguard/conf.d/pg-tests.toml
systemctl daemon-reload
systemctl enable -q portguard.service pg-owner.service pg-resv.service pg-check.service rpcbind.service
systemctl enable -q rpc-statd.service 2> /dev/null || true
echo "portguard installed: $(/opt/portguard/bin/python -c 'import importlib.metadata as m; print(m.version("portguard"))')"
