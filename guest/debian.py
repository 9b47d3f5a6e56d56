#!/usr/bin/env python3
"""Build a real Debian 12 (bookworm) guest from Debian's archive, for the tests that need a real
distribution: systemd, dbus, cloud-init, openssh-server, qemu-guest-agent and the generic kernel.

Why built here and not downloaded: the suite must run on a clean machine with no image prepared by
hand, and Debian's archive is what CI reaches. `mmdebstrap` makes the root tree (as root; `unshare`
mode otherwise), `mkfs.ext4 -d` turns it into a file system image without a loop mount, and the
kernel and initrd are copied out of its /boot, so the guest boots with `-kernel`/`-initrd` and its
root on the virtio disk (`root=/dev/vda`). What makes it boot fast under TCG: the initrd holds only
the virtio and ext4 modules (initramfs-tools MODULES=list), documentation, translations and drivers
no VM uses are never unpacked, and cloud-init runs only the NoCloud data source and the modules a
test uses (users, ssh keys, write_files, runcmd) -- no locale generation, no apt, no growpart.

The result is cached outside the clone (`$XDG_CACHE_HOME/qemuspec-tests/debian-<hash>`, else
`~/.cache/...`), keyed by the hash of the recipe below, so a second CI run skips the build. A build
happens in a temporary directory beside the cache entry, under a lock, and is renamed into place
only when complete.

Output: DIR/vmlinuz, DIR/initrd.img, DIR/root.qcow2 (the base image: tests put overlays on it).
Usage: python3 guest/debian.py [--cache DIR] [--force]   (prints DIR)
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "cloud-init",
    "openssh-server",
    "qemu-guest-agent",
    "linux-image-amd64",
    "initramfs-tools",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "sudo",
    "iproute2",
]
DISK_SIZE = "2G"
# Never unpacked: nothing in a VM test reads them, and they are a third of the tree.
_DRIVERS = [
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/isdn",
    "drivers/net/ethernet",
    "drivers/usb",
    "sound",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
]
EXCLUDE = [
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
    *[f"/lib/modules/*/kernel/{d}/*" for d in _DRIVERS],
]  # the kernel package's paths (/lib, not /usr/lib)
INITRD_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
# Files written into the tree after the packages (path -> text).
FILES = {
    "/etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "/etc/hostname": "debian\n",
    "/etc/cloud/cloud.cfg.d/90-qemuspec.cfg": """\
# qemuspec's test image: NoCloud only (no network metadata services probed), and only the modules
# the tests use, so first boot is short under TCG.
datasource_list: [ NoCloud, None ]
cloud_init_modules: [ seed_random, bootcmd, write-files, set_hostname, update_hostname, update_etc_hosts, users-groups, ssh ]
cloud_config_modules: [ runcmd ]
cloud_final_modules: [ scripts-per-once, scripts-per-boot, scripts-per-instance, scripts-user, final-message ]
""",
}
# Services a VM test never needs (timers that would start apt or e2scrub mid-test).
# A login prompt on the serial console is not needed either.
MASK = [
    "serial-getty@ttyS0.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-timesyncd.service",
]
RECIPE_VERSION = 1

HERE = os.path.dirname(os.path.abspath(__file__))


def recipe() -> dict:
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "exclude": EXCLUDE,
        "modules": INITRD_MODULES,
        "files": FILES,
        "mask": MASK,
        "size": DISK_SIZE,
        "version": RECIPE_VERSION,
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qemuspec-tests")


def entry(cache: str | None = None) -> str:
    return os.path.join(cache or cache_root(), f"debian-{recipe_hash()}")


def complete(path: str) -> bool:
    return all(
        os.path.isfile(os.path.join(path, n))
        for n in ("vmlinuz", "initrd.img", "root.qcow2", "build.json")
    )


def missing_tools() -> list[str]:
    return [
        t
        for t in ("mmdebstrap", "mkfs.ext4", "qemu-img")
        if shutil.which(t) is None
        and not os.path.exists(f"/usr/sbin/{t}")
        and not os.path.exists(f"/sbin/{t}")
    ]


def _customize() -> str:
    """The mmdebstrap customize hook: our files, masked units, and an initrd rebuilt with MODULES=list."""
    lines = ["set -e", 'R="$1"']
    for path, text in FILES.items():
        lines.append(f'mkdir -p "$R{os.path.dirname(path)}"')
        lines.append(f"printf '%s' {_quote(text)} > \"$R{path}\"")
    for unit in MASK:
        lines.append(f'ln -sf /dev/null "$R/etc/systemd/system/{unit}"')
    lines.append('chroot "$R" update-initramfs -u -k all >/dev/null')
    lines.append(
        'rm -f "$R/etc/machine-id" "$R/var/lib/dbus/machine-id"; : > "$R/etc/machine-id"'
    )  # one per boot
    lines.append(
        'rm -f "$R"/etc/ssh/ssh_host_*'
    )  # each instance makes its own (cloud-init's ssh module)
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _essential() -> str:
    """Before the kernel is installed: initramfs-tools builds only the modules the root disk needs."""
    modules = "\\n".join(INITRD_MODULES)
    return (
        'set -e; mkdir -p "$1/etc/initramfs-tools/conf.d"; '
        'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/qemuspec.conf"; '
        f'printf "{modules}\\n" > "$1/etc/initramfs-tools/modules"'
    )


def build(dest: str) -> dict:
    """Build into ``dest`` (an empty directory); returns the build's figures."""
    began = time.monotonic()
    root = os.path.join(dest, "root")
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDE],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--essential-hook={_essential()}",
        f"--customize-hook={_customize()}",
        "--format=directory",
        SUITE,
        root,
        MIRROR,
    ]
    if os.getuid() != 0:
        argv.insert(1, "--mode=unshare")
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    strapped = time.monotonic()
    for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
        found = sorted(glob.glob(os.path.join(root, "boot", pattern)))
        if not found:
            raise SystemExit(f"debian.py: no /boot/{pattern} in the built tree")
        shutil.copyfile(found[-1], os.path.join(dest, name))
    raw = os.path.join(dest, "root.raw")
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run(
        [mkfs, "-q", "-F", "-L", "root", "-d", root, raw, DISK_SIZE],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    shutil.rmtree(root)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(dest, "root.qcow2")],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    os.unlink(raw)
    done = time.monotonic()
    figures = {
        "recipe": recipe_hash(),
        "mmdebstrap_s": round(strapped - began, 1),
        "total_s": round(done - began, 1),
        "qcow2_bytes": os.path.getsize(os.path.join(dest, "root.qcow2")),
    }
    with open(os.path.join(dest, "build.json"), "w") as f:
        json.dump(figures, f)
    return figures


def ensure(cache: str | None = None, force: bool = False, log=None) -> str:
    """The cache entry for the current recipe, built when missing (one build at a time, under a lock)."""
    path = entry(cache)
    if complete(path) and not force:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(path) and not force:  # another run built it while we waited
            return path
        work = tempfile.mkdtemp(
            prefix=os.path.basename(path) + ".build-", dir=os.path.dirname(path)
        )
        try:
            figures = build(work)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(work, path)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if log:
            log(
                f"debian guest built in {figures['total_s']} s (mmdebstrap {figures['mmdebstrap_s']} s): {path}"
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory (default: $XDG_CACHE_HOME/qemuspec-tests)")
    parser.add_argument("--force", action="store_true", help="build again even when cached")
    args = parser.parse_args()
    if missing := missing_tools():
        raise SystemExit(
            f"debian.py: missing {', '.join(missing)}: apt-get install mmdebstrap e2fsprogs qemu-utils"
        )
    print(ensure(args.cache, args.force, log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    main()
