"""Reseed a restored Linux guest's CRNG from the host, through the guest agent.

Every restore of one saved state starts with the same kernel RNG state, so without a reseed two
restores read the same bytes from /dev/urandom. A guest whose kernel has the vmgenid driver reseeds by
itself on the new GUID qemu gives each start (Linux 5.18+, CONFIG_VMGENID); many do not (Debian's cloud
kernel). Writing to /dev/urandom only mixes bytes into the input pool, which the CRNG reads at its next
scheduled reseed (up to a minute later), and the ioctls that credit entropy and force a reseed
(RNDADDENTROPY, RNDRESEEDCRNG, both root-only) need a program; a guest need not have one that makes
them. So qemuspec sends its own: a static x86-64 Linux executable of ~300 bytes, built here (no
toolchain, no libc) around 64 bytes of fresh host entropy, that opens /dev/urandom, credits the
entropy, forces the reseed and exits 0, else 1. The agent runs it as root and it is deleted at once.
It is only used on x86-64 guests (``uname -m`` checked by the same shell line). The guest learns
nothing it could not learn anyway, and qemuspec trusts only its exit code.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
BASE = 0x400000  # where the one PT_LOAD segment is mapped
HEADERS = 64 + 56  # ELF header and one program header


def program(entropy: bytes) -> bytes:
    """The executable: open("/dev/urandom", O_WRONLY); ioctl(fd, RNDADDENTROPY, {bits, len, entropy});
    ioctl(fd, RNDRESEEDCRNG); exit(0), or exit(1) at the first failure."""
    code = bytearray()
    rel32: list[tuple[int, str]] = []  # (offset of a RIP-relative displacement, label)
    rel8: list[tuple[int, str]] = []  # (offset of a short jump's displacement, label)

    def emit(data: bytes) -> None:
        code.extend(data)

    def lea(opcode: bytes, label: str) -> None:
        emit(opcode)
        rel32.append((len(code), label))
        emit(b"\0\0\0\0")

    def jump(opcode: bytes, label: str) -> None:
        emit(opcode)
        rel8.append((len(code), label))
        emit(b"\0")

    emit(b"\xb8\x02\x00\x00\x00")  # mov eax, 2 (open)
    lea(b"\x48\x8d\x3d", "path")  # lea rdi, [rip+path]
    emit(b"\xbe\x01\x00\x00\x00")  # mov esi, O_WRONLY
    emit(b"\x0f\x05")  # syscall
    emit(b"\x85\xc0")  # test eax, eax
    jump(b"\x78", "fail")  # js fail
    emit(b"\x41\x89\xc4")  # mov r12d, eax
    emit(b"\x89\xc7")  # mov edi, eax
    emit(b"\xbe" + struct.pack("<I", RNDADDENTROPY))  # mov esi, RNDADDENTROPY
    lea(b"\x48\x8d\x15", "pool")  # lea rdx, [rip+pool]
    emit(b"\xb8\x10\x00\x00\x00\x0f\x05")  # mov eax, 16 (ioctl); syscall
    emit(b"\x85\xc0")  # test eax, eax
    jump(b"\x75", "fail")  # jnz fail
    emit(b"\x44\x89\xe7")  # mov edi, r12d
    emit(b"\xbe" + struct.pack("<I", RNDRESEEDCRNG))  # mov esi, RNDRESEEDCRNG
    emit(b"\xb8\x10\x00\x00\x00\x0f\x05")  # ioctl
    emit(b"\x85\xc0")
    jump(b"\x75", "fail")
    emit(b"\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05")  # xor edi, edi; mov eax, 60 (exit); syscall
    labels = {"fail": len(code)}
    emit(b"\xbf\x01\x00\x00\x00\xb8\x3c\x00\x00\x00\x0f\x05")  # exit(1)
    labels["path"] = len(code)
    emit(b"/dev/urandom\0")
    labels["pool"] = len(code)  # struct rand_pool_info { int entropy_count; int buf_size; buf[] }
    emit(struct.pack("<ii", 8 * len(entropy), len(entropy)) + entropy)
    for at, label in rel32:
        code[at : at + 4] = struct.pack("<i", labels[label] - (at + 4))
    for at, label in rel8:
        code[at] = labels[label] - (at + 1)
    total = HEADERS + len(code)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9  # 64-bit, little-endian, current version
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, BASE + HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, total, total, 0x1000)  # R+X
    return header + segment + bytes(code)


def reseed(agent: GuestAgent) -> bool:
    """Credit 64 bytes of host entropy to the guest's pool and reseed its CRNG; True when the guest
    (x86-64 Linux, the agent running as root) did both."""
    path = f"/tmp/.qemuspec-reseed-{os.urandom(6).hex()}"
    agent.write_file(path, program(os.urandom(64)))
    line = f'[ "$(uname -m)" = x86_64 ] && chmod 700 {path} && {path}; r=$?; rm -f {path}; exit $r'
    code, _out, _err = agent.exec(["/bin/sh", "-c", line], timeout=10.0)
    return code == 0
