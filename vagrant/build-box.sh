#!/bin/bash
# Build a small Debian Vagrant box (libvirt provider) offline from Debian's packages.
#
#   vagrant/build-box.sh RELEASE        RELEASE: bullseye (5.10) | bookworm (6.1) | trixie (6.12)
#
# bullseye means Debian 11's kernel (5.10, no bpf_set_retval) on a Debian 12 userland: portguard
# needs Python >= 3.11 and Debian 11 ships 3.9, so stock Debian 11 cannot install it at all.
#
# The box is named portguard-RELEASE. It boots without a bootloader: the kernel and a small
# initramfs (virtio + ext4 + 9p only; TCG boots ~6 s faster than with the default one) sit next to
# the image in vagrant/.cache/boxes/RELEASE/ and in the box itself, for lv.kernel / lv.initrd.
#
# Cached: a second run with the same script and release only checks that the box is added.
# Environment: PORTGUARD_MIRROR overrides the Debian mirror, which otherwise comes from this
# machine's own apt sources. PORTGUARD_REBUILD=1 forces a rebuild.
set -euo pipefail

release=${1:?usage: build-box.sh RELEASE (bullseye|bookworm|trixie)}
case $release in bullseye|bookworm|trixie) ;; *) echo "unknown release: $release" >&2; exit 2 ;; esac

here=$(cd "$(dirname "$0")" && pwd)
out=$here/.cache/boxes/$release
box_name=portguard-$release
control=$here/../debian/control   # the package's Depends go into the box
inputs_hash=$( { cat "$0" "$control"; echo "$release"; } | sha256sum | cut -c1-16)

log() { printf '[build-box %s %s] %s\n' "$release" "$(date +%T)" "$*" >&2; }

box_is_added() { vagrant box list 2>/dev/null | grep -q "^$box_name "; }

if [[ ${PORTGUARD_REBUILD:-0} != 1 && -f $out/inputs && $(cat "$out/inputs") == "$inputs_hash" \
      && -f $out/$box_name.box && -f $out/vmlinuz && -f $out/initrd.img ]]; then
  if box_is_added && [[ -f $out/added && $(cat "$out/added") == "$inputs_hash" ]]; then
    log "cached: box $box_name is up to date ($inputs_hash)"
    exit 0
  fi
  log "cached image; adding box $box_name"
  vagrant box add --force --name "$box_name" "$out/$box_name.box" >&2
  echo "$inputs_hash" > "$out/added"
  exit 0
fi

# The Debian mirror this machine already uses (deb822 .sources or one-line sources.list).
debian_mirror() {
  if [[ -n ${PORTGUARD_MIRROR:-} ]]; then echo "$PORTGUARD_MIRROR"; return; fi
  local url
  url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ { uri = $2 } /^Suites:/ { suites = $0 }
      /^$/ { if (uri ~ /\/debian\/?$/ && suites !~ /security/) { print uri; exit } uri = ""; suites = "" }
      END { if (uri ~ /\/debian\/?$/ && suites !~ /security/) print uri }' | head -1)
  if [[ -z $url ]]; then
    url=$(grep -hE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$2 ~ /\/debian\/?$/ && $3 !~ /security/ { print $2; exit }')
  fi
  [[ -n $url ]] || { echo "no Debian mirror found in apt sources; set PORTGUARD_MIRROR" >&2; exit 1; }
  echo "${url%/}"
}

# The binary package's Depends in debian/control, without versions and substitution variables
# (python3 itself is in the base system).
package_depends() {
  python3 - "$control" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
stanza = text[text.index("\nPackage: portguard\n"):]
depends = re.search(r"^Depends:(.*?)(?=^\S|\Z)", stanza, re.S | re.M).group(1)
print(" ".join(d.split()[0] for d in depends.split(",") if d.strip() and "${" not in d))
EOF
}

vagrant_pubkey() {
  local f
  for f in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
           /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [[ -f $f ]] && { cat "$f"; return; }
  done
  echo "Vagrant's insecure public key not found (is vagrant installed?)" >&2; exit 1
}

# Userland suite, and the suite the kernel comes from.
case $release in
  bullseye) userland=bookworm; kernel_suite=bullseye ;;
  *)        userland=$release; kernel_suite=$release ;;
esac

mirror=$(debian_mirror)
log "mirror $mirror"
mkdir -p "$out"
work=$(mktemp -d "$here/.cache/build-$release.XXXXXX")
rootfs=$work/rootfs
cleanup() {
  for m in proc sys dev/pts dev; do mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"; done
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Base system. Everything not needed by debootstrap itself is installed with apt below, so a
#    package missing in one release (bpftool, systemd-networkd) can be skipped instead of failing.
log "debootstrap"
debootstrap --variant=minbase \
  --include=systemd-sysv,udev,dbus,kmod,iproute2,procps,openssh-server,sudo,python3,initramfs-tools,zstd \
  "$userland" "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

in_root() { chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
mount -t proc proc "$rootfs/proc"
mount -t sysfs sys "$rootfs/sys"
mount --bind /dev "$rootfs/dev"
mount --bind /dev/pts "$rootfs/dev/pts"
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"   # start no daemon in the chroot
chmod +x "$rootfs/usr/sbin/policy-rc.d"

# Small initramfs: only what a libvirt/virtio guest needs to mount its root.
mkdir -p "$rootfs/etc/initramfs-tools/conf.d"
echo MODULES=list > "$rootfs/etc/initramfs-tools/conf.d/portguard-small.conf"
printf '%s\n' virtio_pci virtio_blk virtio_net ext4 9p 9pnet_virtio > "$rootfs/etc/initramfs-tools/modules"

# 2. The rest: kernel, what the portguard package depends on (no compiler: the package ships
#    its BPF object), bindresvport callers at boot (rpcbind, rpc.statd from nfs-common),
#    networking. The VMs install the .deb offline, so its Depends must already be here; portguard
#    itself is not: the package scenario installs it on the running system first.
#    python3-pytest runs the repository's own kernel suite (tests/kernel) inside the box, on the
#    box's kernel (run-matrix's "kernel suite" scenario): the bind cases against the roads this
#    machine kind cannot load (security_socket_bind), with no second copy of the tests;
#    python3-prometheus-client lets its metrics test parse what status --metrics prints.
log "apt-get install"
# shellcheck disable=SC2207  # package names: no spaces, no globs
package_depends=($(package_depends))
wanted=("${package_depends[@]}" rpcbind nfs-common bpftool systemd-networkd python3-pytest
        python3-prometheus-client)
[[ $kernel_suite == "$userland" ]] && wanted=(linux-image-amd64 "${wanted[@]}")
in_root apt-get update -qq > /dev/null
available=()
for p in "${wanted[@]}"; do
  if in_root apt-cache show "$p" > /dev/null 2>&1; then available+=("$p"); else log "not in $userland: $p"; fi
done
in_root apt-get install -y -qq --no-install-recommends "${available[@]}" > "$work/apt.log" 2>&1 \
  || { tail -30 "$work/apt.log" >&2; exit 1; }
if [[ $kernel_suite != "$userland" ]]; then
  log "kernel from $kernel_suite"
  echo "deb $mirror $kernel_suite main" > "$rootfs/etc/apt/sources.list.d/kernel.list"
  in_root apt-get update -qq > /dev/null
  in_root apt-get install -y -qq --no-install-recommends -t "$kernel_suite" linux-image-amd64 \
    >> "$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; exit 1; }
  rm "$rootfs/etc/apt/sources.list.d/kernel.list"
  in_root apt-get update -qq > /dev/null
fi
in_root apt-get clean

# 3. Configuration: fstab, hostname, DHCP on the first NIC, vagrant user, quiet and fast boot.
log "configure"
echo "/dev/vda / ext4 defaults,noatime 0 1" > "$rootfs/etc/fstab"
echo "pg-$release" > "$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 pg-%s\n::1 localhost ip6-localhost\n' "$release" > "$rootfs/etc/hosts"
: > "$rootfs/etc/machine-id"
mkdir -p "$rootfs/etc/systemd/network"
cat > "$rootfs/etc/systemd/network/10-dhcp.network" <<'EOF'
[Match]
Name=eth* en*

[Network]
DHCP=yes

[DHCPv4]
ClientIdentifier=mac
EOF
in_root systemctl enable systemd-networkd.service > /dev/null 2>&1
# Nothing slow or periodic in a test VM.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
         systemd-networkd-wait-online.service; do
  in_root systemctl mask "$u" > /dev/null 2>&1 || true
done

in_root useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$rootfs/home/vagrant/.ssh"
vagrant_pubkey > "$rootfs/home/vagrant/.ssh/authorized_keys"
chmod 0600 "$rootfs/home/vagrant/.ssh/authorized_keys"
chown 1000:1000 "$rootfs/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' > "$rootfs/etc/ssh/sshd_config.d/vagrant.conf" 2>/dev/null || echo 'UseDNS no' >> "$rootfs/etc/ssh/sshd_config"

log "initramfs"
in_root update-initramfs -u -k all > /dev/null 2>&1
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -1)
cp "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/initrd.img"
echo "$kver" > "$work/kernel-version"
rm -f "$rootfs/usr/sbin/policy-rc.d"
for m in dev/pts dev sys proc; do umount "$rootfs/$m"; done

# 4. Image: ext4 straight from the tree (no partition table, no bootloader), then qcow2.
log "image"
size_gb=8
mkfs.ext4 -q -F -L root -d "$rootfs" "$work/root.raw" "${size_gb}G"
qemu-img convert -O qcow2 "$work/root.raw" "$work/box.img"
rm -f "$work/root.raw"
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$size_gb" > "$work/metadata.json"
cat > "$work/Vagrantfile" <<'EOF'
# Box Vagrantfile: no bootloader in the image, boot the kernel shipped beside it.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(File.dirname(__FILE__), "vmlinuz")
    lv.initrd = File.join(File.dirname(__FILE__), "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet"
  end
end
EOF

log "pack and add"
tar -C "$work" -cf "$work/$box_name.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
rm -f "$work/box.img"
mv -f "$work/$box_name.box" "$work/vmlinuz" "$work/initrd.img" "$work/kernel-version" "$out/"
chmod 0644 "$out/vmlinuz" "$out/initrd.img"
echo "$inputs_hash" > "$out/inputs"
vagrant box add --force --name "$box_name" "$out/$box_name.box" >&2
echo "$inputs_hash" > "$out/added"
log "done: $box_name, kernel $kver, $(du -h "$out/$box_name.box" | cut -f1)"
