"""The ``%gpu`` line magic and the ``%%gpu`` cell magic.

The magic is thin: it parses options and calls the blocking client
(:mod:`remote_gpu_kernel.sync`). One lease per notebook (per IPython shell)
is taken at the first ``%%gpu`` cell and kept until ``%gpu release``, the
server's idle timeout, or the kernel's end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import tls
from .config import notebook_path
from .errors import ConnectionLost, SessionReleased
from .rendering import render_output
from .sync import Client, Session

__all__ = ["GpuMagics"]


def _names(values: list[str] | None) -> list[str]:
    """``-i a,b -i c`` → ``["a", "b", "c"]``."""
    out: list[str] = []
    for value in values or []:
        out.extend(n.strip() for n in value.split(",") if n.strip())
    return out


class _LineParser(argparse.ArgumentParser):
    """argparse for a line magic: a mistake raises ValueError (one line) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{self.prog}: {message}")


_CONNECT = _LineParser(prog="%gpu connect", add_help=False)
_CONNECT.add_argument("url", nargs="?")
_CONNECT.add_argument("--token")
_CONNECT.add_argument("--cafile")
_CONNECT.add_argument("--insecure", action="store_true", default=None)


def _say(text: str) -> None:
    print(f"[remote-gpu] {text}", file=sys.stderr)


@magics_class
class GpuMagics(Magics):
    """Run cells on a leased GPU; see ``%%gpu?``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Client | None = None
        self.session: Session | None = None
        self._last_session: str | None = None
        self._last_seq = 0

    # -- connection and lease ----------------------------------------------

    def _client(self) -> Client:
        if self.client is None:
            self.client = Client()
        return self.client

    def _session(self, gpus: int | None = None, priority: str | None = None,
                 pool: str | None = None) -> Session:
        session = self.session
        if session is not None and session.released:
            _say(f"Your GPU session was released ({session.released}): its variables are gone; "
                 "leasing a new one.")
            self._last_session = None
            session = self.session = None
        if session is not None and not session.connected:
            self._last_session, self._last_seq = session.id, session.last_seq
            session = self.session = None
        if session is None:
            client = self._client()
            resume = self._last_session
            session = client.session(
                gpus, resume=resume, priority=priority, pool=pool,
                on_queue=lambda pos: _say(f"waiting for a GPU: position {pos} in the queue"),
                on_notice=_say, notebook=notebook_path(),
            )
            self.session = session
            self._last_session = session.id
            if resume and session.resumed and session.parked:
                _say("reconnected to your parked GPU session; the next %%gpu cell restores it.")
            elif resume and session.resumed:
                _say("reconnected to your GPU session; its variables are intact.")
                missed = session.replay(self._last_seq)
                if missed:
                    _say("what the session printed while this notebook was disconnected:")
                    for output in missed:
                        render_output(output)
            elif not session.resumed:
                _say(f"leased {', '.join(session.slots)} as {client.user} (session {session.id[:8]})")
        return session

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.release()
            except Exception:
                pass
            self.session = None

    # -- the magic -----------------------------------------------------------

    @magic_arguments()
    @argument("-i", "--inputs", action="append", metavar="NAME,...",
              help="local variables to push before the cell runs")
    @argument("-o", "--outputs", action="append", metavar="NAME,...",
              help="remote variables to pull back into the local namespace after the cell")
    @argument("--timeout", type=float, default=None, metavar="SECONDS",
              help="interrupt the cell after this many seconds (and restart the worker if it "
                   "ignores the interrupt)")
    @argument("--gpus", type=int, default=None, metavar="N",
              help="how many GPUs to lease if this notebook has no lease yet (default 1)")
    @argument("--priority", choices=["high", "normal", "low"], default=None,
              help="the lease request's priority (default normal)")
    @argument("--pool", default=None, metavar="NAME",
              help="the pool of GPUs to lease from (default: the server's default pool)")
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run a cell on a leased remote GPU, or manage the connection.

        Cell magic::

            %%gpu [-i NAME,...] [-o NAME,...] [--timeout SECONDS] [--gpus N]
                  [--priority high|normal|low] [--pool NAME]

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
        """
        if cell is None:
            return self._line(line)
        args = parse_argstring(self.gpu, line)
        self._run_cell(cell, _names(args.inputs), _names(args.outputs), args.timeout,
                       args.gpus, args.priority, args.pool)
        return None

    def _run_cell(self, code: str, inputs: list[str], outputs: list[str], timeout: float | None,
                  gpus: int | None, priority: str | None = None, pool: str | None = None) -> None:
        ns = self.shell.user_ns
        missing = [n for n in inputs if n not in ns]
        if missing:
            raise NameError(f"%%gpu -i: name {missing[0]!r} is not defined")
        session = self._session(gpus, priority, pool)
        try:
            if inputs:
                session.push(**{n: ns[n] for n in inputs})
            result = session.execute(code, render_output, timeout=timeout, on_queue=lambda pos: _say(
                f"waiting for a GPU to restore your parked session: position {pos} in the queue"))
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
        if outputs:
            ns.update(session.pull(*outputs))

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
            _say(f"will use {self.client.url} (the lease is taken at the first %%gpu cell)")
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
                _say("no GPU is leased")
            else:
                self.close()
                self._last_session = None
                _say("released the GPU")
        elif cmd == "park":
            if self.session is None or self.session.released:
                _say("no GPU session to park")
            else:
                _say(self._session().park().text)
        elif cmd == "resume":
            session = self._session()
            if not session.parked:
                _say("the GPU session is not parked")
            else:
                session.resume(on_queue=lambda pos: _say(
                    f"waiting for a GPU to restore your parked session: position {pos} in the queue"))
        elif cmd == "push":
            ns = self.shell.user_ns
            missing = [n for n in rest if n not in ns]
            if missing:
                raise NameError(f"%gpu push: name {missing[0]!r} is not defined")
            self._session().push(**{n: ns[n] for n in rest})
        elif cmd == "pull":
            self.shell.user_ns.update(self._session().pull(*rest))
        else:
            raise ValueError(f"%gpu {cmd}: unknown command; see %gpu? for help")
        return None
