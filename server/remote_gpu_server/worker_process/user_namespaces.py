"""A seccomp filter that keeps a worker from making user namespaces.

This module runs inside the worker (see :mod:`.confinement`) and imports
only the standard library.

A user namespace gives an unprivileged process every capability inside it:
it may then mount file systems, make network and other namespaces and
reach kernel code that is otherwise root's, the surface most kernel
privilege escalations have gone through. A worker needs none of it. Under
bubblewrap, ``--disable-userns`` already refuses them (it puts the sandbox
in a user namespace of its own whose ``user.max_user_namespaces`` is 0). A
root server's workers run in the host's user namespace, where that limit is
host-wide, so they get this filter instead, the way systemd's
``RestrictNamespaces=`` and Docker's default profile do it:

- ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` fail with ``EPERM``;
- ``clone3``, whose flags sit in memory a filter cannot read, fails with
  ``ENOSYS``, so the C library falls back to ``clone`` (glibc does, for
  threads and ``posix_spawn`` alike);
- everything else is allowed.

The filter covers each system call table the process can reach: on x86-64
the native one, x32's (the same numbers with bit 30 set) and i386's (``int
0x80``); on AArch64 its own and 32-bit ARM's. A call through any other
table kills the process. The filter outlives ``setuid`` and is inherited by
every thread and child; it needs ``no_new_privs`` (or root) to be installed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

__all__ = ["SUPPORTED", "refuse_user_namespaces"]

_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

# <linux/audit.h>: each system call table, and its (clone, unshare, clone3).
_X86_64, _I386 = 0xC000003E, 0x40000003
_AARCH64, _ARM = 0xC00000B7, 0x40000028
_TABLES = {
    _X86_64: (56, 272, 435),
    _I386: (120, 310, 435),
    _AARCH64: (220, 97, 435),
    _ARM: (120, 337, 435),
}
#: The tables a process of each machine can reach.
_MACHINES = {"x86_64": (_X86_64, _I386), "aarch64": (_AARCH64, _ARM)}
#: Machines on which :func:`refuse_user_namespaces` works.
SUPPORTED = tuple(_MACHINES)

# <linux/filter.h> and <linux/seccomp.h>.
_LD_W_ABS, _ALU_AND_K = 0x20, 0x54
_JEQ_K, _JSET_K, _RET_K = 0x15, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_RET_ERRNO = 0x00050000
# struct seccomp_data: nr at 0, arch at 4, args[0] (its low half, little-endian) at 16.
_NR, _ARCH, _ARG0 = 0, 4, 16
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def _block(arch: int) -> list[tuple[int, int, int, int]]:
    """The checks for one system call table; jumps count from the next instruction."""
    clone, unshare, clone3 = _TABLES[arch]
    block = [(_LD_W_ABS, 0, 0, _NR)]
    if arch == _X86_64:
        block.append((_ALU_AND_K, 0, 0, 0xFFFFFFFF ^ _X32_BIT))  # x32's calls are the same calls
    return block + [
        (_JEQ_K, 0, 1, clone3),
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_JEQ_K, 1, 0, clone),
        (_JEQ_K, 0, 3, unshare),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JSET_K, 0, 1, _CLONE_NEWUSER),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
        (_RET_K, 0, 0, _ALLOW),
    ]


def _program(arches: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k): load the table, jump to its block, or kill."""
    blocks = [_block(arch) for arch in arches]
    prog = [(_LD_W_ABS, 0, 0, _ARCH)]
    start = len(arches) + 2  # the first block's index, after the comparisons and the kill
    for index, (arch, block) in enumerate(zip(arches, blocks)):
        prog.append((_JEQ_K, start - (index + 2), 0, arch))
        start += len(block)
    prog.append((_RET_K, 0, 0, _KILL_PROCESS))
    for block in blocks:
        prog += block
    return prog


def refuse_user_namespaces(machine: str | None = None) -> None:
    """Install the filter in this process; see the module docstring. Call it
    after ``no_new_privs`` (or as root). Raises OSError where the kernel
    refuses it, NotImplementedError on a machine not in :data:`SUPPORTED`."""
    machine = machine or platform.machine()
    if machine not in _MACHINES:
        raise NotImplementedError(f"no seccomp filter for {machine}: user namespaces stay allowed")
    prog = _program(_MACHINES[machine])
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filters = ctypes.create_string_buffer(raw, len(raw))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(prog), ctypes.cast(filters, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
