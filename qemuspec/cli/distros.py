"""`qemuspec init --template NAME`: definitions for distributions' official cloud images.

Each names the distribution's own image URL and the checksum file it publishes beside it (the digest
is looked up there once and recorded in the image cache, so the base never changes under the
machine's overlay), a cloud-init user that logs in with qemuspec's generated key, ssh readiness and
``ready.command = "cloud-init status --wait"`` so `up` returns once provisioning is done. The URLs
follow each project's published layout; the tests point the same definitions at a local server.
"""

from __future__ import annotations

# name -> (title, machine name, image URL, checksum-file URL, extra cloud-config lines)
DISTROS: dict[str, tuple[str, str, str, str, str]] = {
    "debian-12": (
        "Debian 12 (bookworm), genericcloud",
        "debian",
        "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
        "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS",
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"\n    shell: /bin/bash\n',
    ),
    "ubuntu-24.04": (
        "Ubuntu 24.04 LTS (noble), server cloud image",
        "ubuntu",
        "https://cloud-images.ubuntu.com/releases/noble/release/ubuntu-24.04-server-cloudimg-amd64.img",
        "https://cloud-images.ubuntu.com/releases/noble/release/SHA256SUMS",
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"\n    shell: /bin/bash\n',
    ),
    "fedora": (
        "Fedora 41 Cloud Base, generic",
        "fedora",
        "https://download.fedoraproject.org/pub/fedora/linux/releases/41/Cloud/x86_64/images/"
        "Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2",
        "https://download.fedoraproject.org/pub/fedora/linux/releases/41/Cloud/x86_64/images/"
        "Fedora-Cloud-41-1.4-x86_64-CHECKSUM",
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"\n    shell: /bin/bash\n',
    ),
    "alpine": (
        "Alpine 3.20, NoCloud BIOS image with cloud-init",
        "alpine",
        "https://dl-cdn.alpinelinux.org/alpine/v3.20/releases/cloud/"
        "nocloud_alpine-3.20.3-x86_64-bios-cloudinit-r0.qcow2",
        "https://dl-cdn.alpinelinux.org/alpine/v3.20/releases/cloud/"
        "nocloud_alpine-3.20.3-x86_64-bios-cloudinit-r0.qcow2.sha512",
        '    doas: ["permit nopass qemuspec"]\n    shell: /bin/ash\n',
    ),
}

TEMPLATE = '''\
# {title}: the distribution's official cloud image, checked against the checksum file it publishes
# and cached once per user ($XDG_CACHE_HOME/qemuspec/images; `qemuspec img ls`). The disk file is
# this machine's own overlay on that image, made on `up`; the image itself is never written.
# Start: `qemuspec up {path}`, then `qemuspec ssh {path}` (user qemuspec, the generated key).

[machines.{name}]
memory = "2G"
cpus = 2
rng = true
stop_timeout = "60s"

[[machines.{name}.disks]]
file = "{name}.qcow2"
size = "10G"                 # the overlay's size: the guest grows its root file system to it
image = {{ url = "{url}", digest_url = "{digest_url}" }}

[[machines.{name}.nics]]
type = "user"
outbound = true              # package mirrors; the guest then also reaches this host's loopback services
forwards = [{{ host = 0, guest = 22 }}]

[machines.{name}.cloud_init]
user_data = """#cloud-config
users:
  - name: qemuspec
    ssh_authorized_keys: ["{{{{ ssh_public_key }}}}"]
{extra}"""

[machines.{name}.ssh]
user = "qemuspec"

[machines.{name}.ready]
ssh = true
command = "cloud-init status --wait"   # `up` returns once provisioning is done
timeout = "15m"                        # a first boot under TCG takes minutes
'''


def render(template: str, path: str) -> str:
    title, name, url, digest_url, extra = DISTROS[template]
    return TEMPLATE.format(
        title=title, name=name, url=url, digest_url=digest_url, extra=extra, path=path
    )
