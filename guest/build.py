#!/usr/bin/env python3
"""Build the small real Linux guest that qemuspec's demo machine and tests boot.

Debian's cloud kernel (extracted from its package with `apt-get download` + `dpkg-deb -x`, no root),
and an initramfs written here in Python (newc cpio, so device nodes need no root): static busybox,
the virtio/console/balloon/button/evdev modules in dependency order (the package ships no modules.dep, so
each module's `depends=` is read), and, when the host has them, dropbear and qemu-ga with their
libraries. The guest prints a marker on the serial console, powers off on the ACPI power button,
brings eth0 up for user-mode networking, serves HTTP on 80 and a banner on 7777, runs the guest
agent, and obeys `qemuspec.noacpi`, `qemuspec.stamp=WORD` (write a per-boot stamp to /dev/vda's first sector), `qemuspec.exit=N` (power off after N s) and `qemuspec.panic=N`
(kernel panic after N s, reported through a pvpanic device) on its kernel command line.

Output: guest/out/vmlinuz and guest/out/initrd.gz, rebuilt only when the inputs change.
Usage: python3 guest/build.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Variants: the cloud kernel boots fastest; the generic one has CONFIG_VMGENID (warm-start tests need it)
KERNELS = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
MODULES = [
    "virtio_pci",
    "virtio_net",
    "virtio_console",
    "virtio_blk",
    "virtio-rng",
    "virtio_balloon",
    "button",
    "evdev",
    "virtio_scsi",
    "sr_mod",
    "isofs",
    "pvpanic-pci",
    "pvpanic-mmio",
]
MARKER = "qemuspec-guest ready"
BINARIES = ["/usr/sbin/dropbear", "/usr/bin/dropbearkey", "/usr/sbin/qemu-ga"]

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /usr/bin /usr/sbin /var/log /var/run /etc/dropbear
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}"; return;; "$1") echo 1; return;; esac; done; }
hostname qemuspec-guest
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
# A NoCloud seed on a virtio-scsi cdrom: show the user-data, take its ssh keys, apply static addresses
if grep -qx 0x0008 /sys/bus/virtio/devices/*/device 2>/dev/null; then
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do [ -b /dev/sr0 ] && break; sleep 0.2; done
fi
if [ -b /dev/sr0 ] && mkdir -p /cidata && mount -t iso9660 -o ro /dev/sr0 /cidata 2>/dev/null; then
  echo "qemuspec-guest: cidata user-data:"
  sed 's/^/ci| /' /cidata/user-data
  mkdir -p /root/.ssh && chmod 700 /root/.ssh
  grep -o 'ssh-[a-z0-9-]* [A-Za-z0-9+/=]*' /cidata/user-data > /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
  if [ -f /cidata/network-config ]; then
    mac=""
    while read -r line; do
      case "$line" in
        macaddress:*) mac=$(echo "$line" | sed 's/.*"\(.*\)".*/\1/');;
        -\ \"*) addr=$(echo "$line" | sed 's/.*"\(.*\)".*/\1/')
          for d in /sys/class/net/*; do
            if [ "$(cat $d/address)" = "$mac" ]; then
              ip addr add $addr dev ${d##*/}; ip link set ${d##*/} up; echo "qemuspec-guest: ${d##*/} $addr"
            fi
          done;;
      esac
    done < /cidata/network-config
  fi
fi
s=$(arg qemuspec.stamp)
if [ -n "$s" ] && [ -b /dev/vda ]; then
  s="stamp-$s-$(cat /proc/sys/kernel/random/uuid)"
  echo "$s" | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null && echo "qemuspec-guest: disk $s"
fi
# the power button is watched before any service starts, so a client that saw a service answer
# can always power the guest off
if [ -z "$(arg qemuspec.noacpi)" ]; then
  for e in /sys/class/input/event*; do
    if grep -q "Power Button" $e/device/name 2>/dev/null; then
      (dd if=/dev/input/${e##*/} bs=24 count=1 >/dev/null 2>&1; echo "qemuspec-guest: power button"; poweroff -f) &
    fi
  done
else
  echo "qemuspec-guest: ignoring ACPI"
fi
httpd -p 80 -h /www
(while true; do echo "qemuspec-guest banner" | nc -l -p 7777 >/dev/null 2>&1; done) &
[ -x /usr/sbin/dropbear ] && dropbear -R -B -p 22 2>/dev/null
for d in /sys/class/virtio-ports/*; do
  if [ "$(cat $d/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    mkdir -p /dev/virtio-ports
    ln -sf /dev/${d##*/} /dev/virtio-ports/org.qemu.guest_agent.0
    [ -x /usr/sbin/qemu-ga ] && qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run >/dev/null 2>&1 &
  fi
done
p=$(arg qemuspec.panic)
[ -n "$p" ] && (sleep $p; echo "qemuspec-guest: panicking"; echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger) &
n=$(arg qemuspec.exit)
[ -n "$n" ] && (sleep $n; echo "qemuspec-guest: exiting after $n s"; poweroff -f) &
echo "__MARKER__"
while true; do setsid cttyhack sh -l; done
""".replace("__MARKER__", MARKER)


class Cpio:
    """A newc archive built in memory: every entry owned by root, whatever user builds it."""

    def __init__(self) -> None:
        self.data = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        body: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        self.names.add(name)
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self.ino,
                mode,
                0,
                0,
                nlink,
                0,
                len(body),
                0,
                0,
                rdev[0],
                rdev[1],
                len(name) + 1,
                0,
            )
        )
        self.ino += 1
        self.data.write(header.encode() + name.encode() + b"\0")
        self._pad()
        self.data.write(body)
        self._pad()

    def _pad(self) -> None:
        self.data.write(b"\0" * (-self.data.tell() % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.names:
                self._entry(path, 0o040755, nlink=2)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        if "/" in name.strip("/"):
            self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), 0o100000 | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.data.getvalue()


def run(*argv: str, cwd: str | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def kernel_package(meta: str = KERNEL_PACKAGE) -> str:
    """The versioned kernel package the meta package points at."""
    out = run("apt-cache", "depends", meta)
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not match:
        sys.exit(f"cannot resolve {meta} (run apt-get update first)")
    return match.group(1)


def cached_tree(cache: str, meta: str) -> str | None:
    """An already unpacked kernel of this flavour, so a build works offline once it has run."""
    flavour = "-cloud-amd64" if "cloud" in meta else "-amd64"
    trees = sorted(
        t
        for t in glob.glob(os.path.join(cache, "linux-image-*" + flavour))
        if os.path.isdir(os.path.join(t, "boot")) and ("cloud" in meta) == ("-cloud-" in t)
    )
    return trees[-1] if trees else None


def fetch_kernel(cache: str, meta: str = KERNEL_PACKAGE) -> str:
    """Download and unpack the kernel package once; return the unpacked tree."""
    try:
        package = kernel_package(meta)
    except (OSError, subprocess.CalledProcessError, SystemExit):
        tree = cached_tree(cache, meta)
        if tree is None:
            raise
        return tree
    tree = os.path.join(cache, package)
    if os.path.isdir(os.path.join(tree, "boot")):
        return tree
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write here
        run("apt-get", "download", "-q", package, cwd=tmp)
        deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
        unpacked = os.path.join(tmp, "tree")
        run("dpkg-deb", "-x", deb, unpacked)
        shutil.rmtree(tree, ignore_errors=True)
        os.rename(unpacked, tree)
    return tree


def module_files(tree: str) -> dict[str, str]:
    files = {}
    for path in glob.glob(os.path.join(tree, "lib/modules/*/kernel/**/*.ko*"), recursive=True):
        name = os.path.basename(path).split(".ko")[0]
        files[name] = path
        files[name.replace("-", "_")] = path
    return files


def read_module(path: str) -> bytes:
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


def depends(body: bytes) -> list[str]:
    match = re.search(rb"depends=([^\0]*)\0", body)
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def module_order(files: dict[str, str], wanted: list[str]) -> list[str]:
    """Dependencies first, each module once (depth-first over `depends=`)."""
    order: list[str] = []

    def visit(name: str) -> None:
        key = name if name in files else name.replace("-", "_")
        if key not in files:
            return  # built into the kernel
        canonical = os.path.basename(files[key]).split(".ko")[0]
        if canonical in order:
            return
        for dep in depends(read_module(files[key])):
            visit(dep)
        order.append(canonical)

    for name in wanted:
        visit(name)
    return order


def libraries(binary: str) -> list[str]:
    out = run("ldd", binary)
    libs = re.findall(r"=>\s*(/\S+)", out) + re.findall(r"^\s*(/\S+)\s*\(", out, re.M)
    return sorted(set(libs))


def inputs_digest(tree: str) -> str:
    digest = hashlib.sha256(
        INIT.encode() + json.dumps(MODULES).encode() + os.path.basename(tree).encode()
    )
    digest.update(open(__file__, "rb").read())
    for binary in ["/bin/busybox", *BINARIES]:
        if os.path.exists(binary):
            digest.update(f"{binary}:{os.stat(binary).st_mtime_ns}".encode())
    return digest.hexdigest()


def build(out: str, cache: str, force: bool = False, kernel: str = "cloud") -> dict:
    tree = fetch_kernel(cache, KERNELS[kernel])
    stamp_path = os.path.join(out, "stamp.json")
    digest = inputs_digest(tree)
    if not force and os.path.exists(stamp_path):
        stamp = json.load(open(stamp_path))
        if stamp.get("digest") == digest and all(
            os.path.exists(os.path.join(out, f)) for f in ("vmlinuz", "initrd.gz")
        ):
            return stamp
    if not os.path.exists("/bin/busybox"):
        sys.exit("guest/build.py needs a static busybox: apt-get install busybox-static")

    cpio = Cpio()
    for d in (
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "www",
        "lib/modules",
        "usr/bin",
        "usr/sbin",
    ):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", open("/bin/busybox", "rb").read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/shadow", b"root::19000:0:99999:7:::\n", 0o600)
    cpio.file("etc/shells", b"/bin/sh\n")
    cpio.file("www/index.html", b"qemuspec-guest http ok\n")

    files = module_files(tree)
    order = module_order(files, MODULES)
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", read_module(files[name]))
    cpio.file("etc/modules", ("\n".join(order) + "\n").encode())

    extras = []
    copied: set[str] = set()
    for binary in BINARIES:
        if not os.path.exists(binary):
            print(
                f"note: {binary} not found on this host; the guest is built without it",
                file=sys.stderr,
            )
            continue
        extras.append(binary)
        for path in [binary, *libraries(binary)]:
            real = os.path.realpath(path)
            if path in copied:
                continue
            copied.add(path)
            cpio.file(path.lstrip("/"), open(real, "rb").read(), 0o755)

    os.makedirs(out, exist_ok=True)
    vmlinuz = glob.glob(os.path.join(tree, "boot/vmlinuz-*"))[0]
    shutil.copyfile(vmlinuz, os.path.join(out, "vmlinuz.tmp"))
    os.replace(os.path.join(out, "vmlinuz.tmp"), os.path.join(out, "vmlinuz"))
    with open(os.path.join(out, "initrd.gz.tmp"), "wb") as f:
        f.write(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    os.replace(os.path.join(out, "initrd.gz.tmp"), os.path.join(out, "initrd.gz"))
    stamp = {
        "digest": digest,
        "kernel": os.path.basename(vmlinuz),
        "modules": order,
        "extras": extras,
        "marker": MARKER,
    }
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=2)
    return stamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--cache", default=os.path.join(HERE, "cache"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument(
        "--kernel",
        choices=sorted(KERNELS),
        default="cloud",
        help="cloud (default, fastest boot) or generic (has CONFIG_VMGENID; default --out guest/out-generic)",
    )
    args = parser.parse_args()
    if args.kernel != "cloud" and args.out == os.path.join(HERE, "out"):
        args.out = os.path.join(HERE, f"out-{args.kernel}")
    stamp = build(args.out, args.cache, args.force, args.kernel)
    print(
        f"guest ready in {args.out}: {stamp['kernel']}, modules {' '.join(stamp['modules'])}, extras {' '.join(os.path.basename(e) for e in stamp['extras']) or 'none'}"
    )


if __name__ == "__main__":
    main()
