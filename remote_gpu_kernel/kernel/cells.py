"""How the Remote GPU kernel reads a cell: pure functions, no I/O.

A cell is one of three things:

* ``%%local`` on its first line: the rest runs in the kernel's own process,
  in the local namespace; nothing is leased.
* ``%gpu COMMAND ARGS`` lines at the top or the bottom of a cell: commands
  for the kernel itself (``push NAME...``, ``pull NAME...``, ``upload
  PATH...``, ``download PATH...``, ``fetch on|off``, ``status``,
  ``release``, ``park``, ``resume``, ``env show|reset``; paths are split
  as a shell would, so a name with spaces is quoted). Those at the top run in order before the rest of the cell,
  which (if any) runs remotely; those at the bottom run after it, if it
  succeeded.
* anything else: runs on the leased GPU, unchanged.

Blank lines and comment lines before the first ``%gpu`` line or ``%%local``
are allowed. :func:`parse_cell` raises :class:`CellSyntaxError` with a
message meant for the user when a ``%gpu`` line is malformed.
"""

from __future__ import annotations

import dataclasses
import enum
import shlex

from remote_gpu_core.errors import CellSyntaxError

__all__ = ["COMMANDS", "ENV_ACTIONS", "PATH_COMMANDS", "Cell", "CellKind", "CellSyntaxError", "GpuCommand", "parse_cell"]

#: ``%gpu`` commands and whether they take arguments (variable names or paths).
COMMANDS: dict[str, bool] = {"push": True, "pull": True, "upload": True, "download": True,
                             "fetch": True, "status": False, "release": False, "park": False, "resume": False,
                             "env": True}
#: What ``%gpu env`` does: list, or remove, the packages the user installed on the server.
ENV_ACTIONS = ("show", "reset")
#: Commands whose arguments are paths, not variable names.
PATH_COMMANDS = frozenset({"upload", "download"})

_USAGE = (
    "usage: %gpu push NAME [NAME ...] | %gpu pull NAME [NAME ...] | %gpu upload PATH [PATH ...] | "
    "%gpu download PATH [PATH ...] | %gpu fetch on|off | %gpu status | %gpu release | %gpu park | "
    "%gpu resume | %gpu env show|reset"
)


class CellKind(str, enum.Enum):
    REMOTE = "remote"
    LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class GpuCommand:
    """One ``%gpu`` line: ``name`` is a key of :data:`COMMANDS`."""

    name: str
    args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cell:
    """A parsed cell: ``commands`` run first, then ``body`` where ``kind`` says, then ``after``."""

    kind: CellKind
    body: str
    commands: tuple[GpuCommand, ...] = ()
    after: tuple[GpuCommand, ...] = ()

    @property
    def has_body(self) -> bool:
        return bool(self.body.strip())


def _parse_command(line: str) -> GpuCommand:
    try:
        words = shlex.split(line)[1:]
    except ValueError as exc:
        raise CellSyntaxError(f"{line.strip()}: {exc}") from None
    if not words:
        raise CellSyntaxError(_USAGE)
    name, args = words[0], tuple(words[1:])
    if name not in COMMANDS:
        raise CellSyntaxError(f"%gpu {name}: unknown command; {_USAGE}")
    if name == "env":
        if args not in tuple((a,) for a in ENV_ACTIONS):
            raise CellSyntaxError(f"%gpu env takes one of: {', '.join(ENV_ACTIONS)}; {_USAGE}")
        return GpuCommand(name, args)
    takes_names = COMMANDS[name]
    what = "path" if name in PATH_COMMANDS else "variable name"
    if takes_names and not args:
        raise CellSyntaxError(f"%gpu {name} needs at least one {what}; {_USAGE}")
    if not takes_names and args:
        raise CellSyntaxError(f"%gpu {name} takes no arguments; {_USAGE}")
    if name == "fetch" and args not in (("on",), ("off",)):
        raise CellSyntaxError(f"%gpu fetch takes on or off; {_USAGE}")
    for arg in args if name not in PATH_COMMANDS else ():
        if not arg.isidentifier():
            raise CellSyntaxError(f"%gpu {name}: {arg!r} is not a variable name")
    return GpuCommand(name, args)


def _is_command(line: str) -> bool:
    stripped = line.strip()
    return stripped == "%gpu" or stripped.startswith("%gpu ")


def parse_cell(code: str) -> Cell:
    """Split ``code`` into kernel commands and a body; see the module docstring."""
    lines = code.splitlines(keepends=True)
    commands: list[GpuCommand] = []
    index = len(lines)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not commands):
            continue
        if stripped.startswith("%%local") and not commands:
            head = stripped.split()
            if head[0] != "%%local":
                index = i
                break
            if len(head) > 1:
                raise CellSyntaxError("%%local takes no arguments: put the code on the next lines")
            return Cell(CellKind.LOCAL, "".join(lines[i + 1 :]))
        if _is_command(stripped):
            commands.append(_parse_command(stripped))
            continue
        index = i
        break
    rest = lines[index:] if commands else lines
    end = len(rest)
    while end > 0 and (not rest[end - 1].strip() or _is_command(rest[end - 1])):
        end -= 1
    after = tuple(_parse_command(line.strip()) for line in rest[end:] if line.strip())
    return Cell(CellKind.REMOTE, "".join(rest[:end]), tuple(commands), after)
