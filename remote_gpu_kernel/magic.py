"""The ``%gpu`` line magic and the ``%%gpu`` cell magic.

The magic is thin: it parses options and calls the blocking client
(:mod:`remote_gpu_kernel.sync`). One lease per notebook (per IPython shell)
is taken at the first ``%%gpu`` cell and kept until ``%gpu release``, the
server's idle timeout, or the kernel's end: shutting down or restarting the
kernel gives it back at once (an ``atexit`` hook). Remote widgets work
through :class:`~remote_gpu_kernel.magic_comms.CommBridge`. What the magic
says is worded as the Remote GPU kernel says it (:mod:`.notices`).
"""

from __future__ import annotations

import argparse
import atexit
import shlex
import sys
import weakref
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar, cast

from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import notices
from remote_gpu_core import tls
from remote_gpu_core.login import notebook_path
from remote_gpu_core.errors import ConnectionLost, SessionReleased
from .magic_comms import CommBridge
from .notebook_files import folder_for
from .rendering import render_output
from .sync import Client, Session

__all__ = ["GpuMagics"]

#: At the kernel's end, how long to wait for the lease to be given back.
RELEASE_AT_EXIT = 5.0


def _names(values: list[str] | None) -> list[str]:
    """``-i a,b -i c`` → ``["a", "b", "c"]``."""
    out: list[str] = []
    for value in values or []:
        out.extend(n.strip() for n in value.split(",") if n.strip())
    return out


_F = TypeVar("_F", bound=Callable[..., Any])


class _Decorator(Protocol):
    def __call__(self, func: _F, /) -> _F: ...


# IPython leaves its magic_arguments helpers unannotated; these are their types.
_magic_arguments = cast(Callable[[], _Decorator], magic_arguments)
_argument = cast(Callable[..., _Decorator], argument)
_parse_argstring = cast(Callable[[Any, str], argparse.Namespace], parse_argstring)
# Typed as returning either the method or a decorator; used bare, it returns the method.
_line_cell_magic = cast(_Decorator, line_cell_magic)


class _LineParser(argparse.ArgumentParser):
    """argparse for a line magic: a mistake raises ValueError (one line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message}")


_CONNECT = _LineParser(prog="%gpu connect", add_help=False)
_CONNECT.add_argument("url", nargs="?")
_CONNECT.add_argument("--token")
_CONNECT.add_argument("--cafile")
_CONNECT.add_argument("--insecure", action="store_true", default=None)


def _say(text: str) -> None:
    """A warning the user must read (variables lost): stderr, as the kernel says it."""
    print(f"{notices.PREFIX}{text}", file=sys.stderr)


def _release_at_exit(ref: weakref.ref[GpuMagics]) -> None:
    magics = ref()
    if magics is not None:
        magics.close(timeout=RELEASE_AT_EXIT)


@magics_class
class GpuMagics(Magics):
    """Run cells on a leased GPU; see ``%%gpu?``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Client | None = None
        self.session: Session | None = None
        self._last_session: str | None = None
        self._last_seq = 0
        #: ``%gpu fetch on|off``; None: RGPU_FETCH decides (see :mod:`.notebook_files`).
        self.fetch: bool | None = None
        self.comms = CommBridge(shell, lambda: self.session, render_output)
        # A kernel that shuts down or restarts gives its GPU back now, not
        # after the server's grace period.
        atexit.register(_release_at_exit, weakref.ref(self))

    @property
    def ipython(self) -> InteractiveShell:
        """The shell these magics belong to (IPython makes magics with one)."""
        shell = self.shell
        assert shell is not None, "GpuMagics is made with its shell"
        return shell

    # -- connection and lease ----------------------------------------------

    def _client(self) -> Client:
        if self.client is None:
            self.client = Client()
        return self.client

    def _session(self, gpus: int | None = None, priority: str | None = None,
                 pool: str | None = None, env: str | None = None) -> Session:
        session = self.session
        if session is not None and session.released:
            _say(f"The GPU session was released ({session.released}): leasing a new one; "
                 "the variables of the old one are gone.")
            self._last_session = None
            session = self.session = None
        if session is not None and not session.connected:
            self._last_session, self._last_seq = session.id, session.last_seq
            session = self.session = None
        if session is None:
            client = self._client()
            resume = self._last_session
            line = notices.StatusLine(notices.publish_display)
            session = client.session(
                gpus, resume=resume, priority=priority, pool=pool,
                on_queue=lambda pos: line.show(notices.queued(pos)),
                on_notice=_say, notebook=notebook_path(), say_mismatch=False, env=env,
            )
            session.on_background = self.comms.background
            if self.fetch is not None:
                session.notebook_files = folder_for(self.fetch, notebook_path())
            self.session = session
            self._last_session = session.id
            if resume and session.resumed and session.parked:
                line.show(notices.resumed_parked(session.id, "the next %%gpu cell"))
            elif resume and session.resumed:
                line.show(notices.resumed(session.slots, session.id))
                missed = session.replay(self._last_seq)
                if missed:
                    _say("what the session printed while this notebook was disconnected:")
                    for output in missed:
                        render_output(output)
            else:
                line.show(notices.granted(session.slots, client.url, session.id, session.waited, client.user,
                                          session.mismatch))
        return session

    def close(self, timeout: float | None = None) -> None:
        """Give the GPU back; safe to call twice. Its widgets stay on the page
        and say that they no longer work when touched."""
        if self.session is not None:
            session, self.session = self.session, None
            try:
                session.release(timeout=timeout)
            except Exception:
                pass

    # -- the magic -----------------------------------------------------------

    @_magic_arguments()
    @_argument("-i", "--inputs", action="append", metavar="NAME,...",
              help="local variables to push before the cell runs")
    @_argument("-o", "--outputs", action="append", metavar="NAME,...",
              help="remote variables to pull back into the local namespace after the cell")
    @_argument("--timeout", type=float, default=None, metavar="SECONDS",
              help="interrupt the cell after this many seconds (and restart the worker if it "
                   "ignores the interrupt)")
    @_argument("--gpus", type=int, default=None, metavar="N",
              help="how many GPUs to lease if this notebook has no lease yet (default 1)")
    @_argument("--priority", choices=["high", "normal", "low"], default=None,
              help="the lease request's priority (default normal)")
    @_argument("--pool", default=None, metavar="NAME",
              help="the pool of GPUs to lease from (default: the server's default pool)")
    @_argument("--env", default=None, metavar="NAME",
              help="the Python environment of the worker, if this notebook has no lease yet "
                   "(default: RGPU_ENV, else the server's own Python, 'default'; rgpu envs lists them)")
    @_line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run a cell on a leased remote GPU, or manage the connection.

        Cell magic::

            %%gpu [-i NAME,...] [-o NAME,...] [--timeout SECONDS] [--gpus N]
                  [--priority high|normal|low] [--pool NAME] [--env NAME]

        leases a GPU for this notebook if it has none (from RGPU_URL and
        RGPU_TOKEN, or the saved config), pushes the ``-i`` variables, runs the
        cell remotely with its output streamed here, and pulls the ``-o``
        variables back. The remote namespace lives on between cells.
        Interrupting this cell interrupts the remote cell; a cell that ignores
        the interrupt says so a few seconds later, and interrupting it again
        restarts the remote worker (its variables are lost).

        Line magic::

            %gpu connect [URL] [--token TOKEN] [--cafile PATH] [--insecure]
                                                 choose the server (default: RGPU_URL, RGPU_TOKEN);
                                                 --cafile trusts a CA or a self-signed server's
                                                 certificate (RGPU_CA); --insecure allows plain
                                                 ws:// to another host (RGPU_INSECURE=1)
            %gpu status                          the server, user and lease
            %gpu release                         give the GPU back (remote variables are lost)
            %gpu park                            save the remote variables to disk on the server and
                                                 give the GPU back; the next %%gpu cell restores them
            %gpu resume                          restore a parked session now
            %gpu push NAME...                    copy local variables to the GPU session
            %gpu pull NAME...                    copy remote variables here
            %gpu upload PATH...                  send files or folders to the session's folder
            %gpu download PATH...                fetch files or folders from it
            %gpu fetch on|off                    whether remote cells may read files of this
                                                 notebook's folder (default on; RGPU_FETCH=0: off)
            %gpu env show                        the packages you installed on the server (%pip
                                                 install in a remote cell), kept across sessions
            %gpu env reset                       remove them all

        Remote cells run in the session's own folder on the GPU server. A
        cell that opens ``images/x.png`` for reading, which is not there, gets
        it from this notebook's folder, once (read-only: never from outside
        the folder, hidden files, or over RGPU_FETCH_MAX, default 1 GiB);
        ``%gpu upload PATH`` sends other files, and ``%gpu download
        results.csv`` brings a result back here.
        """
        if cell is None:
            return self._line(line)
        args = _parse_argstring(self.gpu, line)
        self._run_cell(cell, _names(args.inputs), _names(args.outputs), args.timeout,
                       args.gpus, args.priority, args.pool, args.env)
        return None

    def _run_cell(self, code: str, inputs: list[str], outputs: list[str], timeout: float | None,
                  gpus: int | None, priority: str | None = None, pool: str | None = None,
                  env: str | None = None) -> None:
        ns = self.ipython.user_ns
        missing = [n for n in inputs if n not in ns]
        if missing:
            raise NameError(f"%%gpu -i: name {missing[0]!r} is not defined")
        session = self._session(gpus, priority, pool, env)
        parent = self.comms.current_parent()
        line = notices.StatusLine(notices.publish_display)
        try:
            # One round trip: the inputs, the cell and the names to pull go out
            # together. Under this cell's own msg_id: a remote Output widget
            # then captures what this cell shows, as a local one would. Under
            # this cell's number too: a remote traceback says Cell In[N] as
            # the prompt does.
            result = session.run(code, self.comms.show, push={n: ns[n] for n in inputs}, pull=outputs,
                                 timeout=timeout, parent=parent.get("header"),
                                 on_queue=lambda pos: line.show(notices.restoring(pos)),
                                 on_fetched=lambda text: notices.StatusLine(notices.publish_display).show(
                                     f"{notices.PREFIX}{text}"),
                                 execution_count=self._cell_number(parent))
        # The cell did not finish: each of these fails it (so "Run All"
        # stops here), shown as one line that says what to do next.
        except ConnectionLost as exc:
            raise ConnectionLost(f"{exc}. The next %%gpu cell reconnects; the session survives "
                                 "a short drop.") from None
        except SessionReleased as exc:
            self.session = None
            self._last_session = None
            raise SessionReleased(f"{exc}; run the cell again to lease a new GPU.", code=exc.code) from None
        if result.error is not None:
            raise result.error
        ns.update(result.values)

    def _cell_number(self, parent: dict[str, Any]) -> int:
        """The number the prompt shows for the cell that runs now; 0 for one not
        stored in the history. IPython counts a stored cell before running it."""
        content = parent.get("content") or {}
        if content.get("silent") or not content.get("store_history", True):
            return 0
        return max(0, int(self.ipython.execution_count) - 1)

    def _transfer(self, cmd: str, paths: list[str]) -> None:
        """``%gpu upload|download PATH...``: sizes always; a large transfer shows
        its progress as a push or pull does (the session's ``on_progress``)."""
        if not paths:
            raise ValueError(f"%gpu {cmd} needs at least one path; see %gpu? for help")
        session = self._session()
        moved = session.upload(*paths) if cmd == "upload" else session.download(*paths)
        notices.StatusLine(notices.publish_display).show(notices.transferred(f"{cmd}ed", moved))

    def _line(self, line: str) -> Any:
        words = shlex.split(line)
        if not words:
            print(self.gpu.__doc__)
            return None
        cmd, rest = words[0], words[1:]
        if cmd == "connect":
            args = _CONNECT.parse_args(rest)
            client = Client(args.url, args.token, cafile=args.cafile, insecure=args.insecure)
            # Say now, not at the first cell, that this server cannot be used as given.
            config = client.config
            tls.refuse_plain_text(config.url, config.insecure)
            tls.ssl_context(config.url, config.cafile)
            self.close()
            self._last_session = None
            self.client = client
            print(f"{notices.PREFIX}will use {self.client.url} (the lease is taken at the first %%gpu cell)")
        elif cmd == "status":
            client = self._client()
            s = self.session
            print(f"server: {client.url}")
            print(f"user:   {client.user or '(not connected yet)'}")
            if s is None or s.released:
                print("lease:  none (the next %%gpu cell takes one)")
            elif s.parked:
                print(f"lease:  parked (session {s.id[:8]}; no GPU held, the next %%gpu cell restores it)")
            else:
                print(f"lease:  {', '.join(s.slots)} (session {s.id[:8]}, "
                      f"{'connected' if s.connected else 'disconnected'})")
        elif cmd == "release":
            if self.session is None:
                print(f"{notices.PREFIX}no GPU is leased")
            else:
                self.close()
                self._last_session = None
                print(f"{notices.PREFIX}released the GPU; its variables are gone")
        elif cmd == "park":
            if self.session is None or self.session.released:
                print(f"{notices.PREFIX}no GPU session to park")
            else:
                print(f"{notices.PREFIX}{self._session().park().text}")
        elif cmd == "resume":
            session = self._session()
            if not session.parked:
                print(f"{notices.PREFIX}the GPU session is not parked")
            else:
                status = notices.StatusLine(notices.publish_display)
                session.resume(on_queue=lambda pos: status.show(notices.restoring(pos)))
        elif cmd == "push":
            ns = self.ipython.user_ns
            missing = [n for n in rest if n not in ns]
            if missing:
                raise NameError(f"%gpu push: name {missing[0]!r} is not defined")
            self._session().push(**{n: ns[n] for n in rest})
        elif cmd == "pull":
            self.ipython.user_ns.update(self._session().pull(*rest))
        elif cmd in ("upload", "download"):
            self._transfer(cmd, rest)
        elif cmd == "env":
            if rest not in (["show"], ["reset"]):
                raise ValueError("usage: %gpu env show|reset; see %gpu? for help")
            result = self._session().execute(notices.env_code(rest[0]), self.comms.show)
            if result.error is not None:
                raise result.error
        elif cmd == "fetch":
            if rest not in (["on"], ["off"]):
                raise ValueError("usage: %gpu fetch on|off")
            self.fetch = rest == ["on"]
            if self.session is not None:
                self.session.notebook_files = folder_for(self.fetch, notebook_path())
            where = "this notebook's folder" if self.fetch else "nowhere"
            print(f"{notices.PREFIX}remote cells fetch the files they open from {where}")
        else:
            raise ValueError(f"%gpu {cmd}: unknown command; see %gpu? for help")
        return None
