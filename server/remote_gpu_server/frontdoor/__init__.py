"""The server's port: TLS, the websocket handshake and the HTTP API.

:mod:`.door` takes every connection on the one port: it checks the
``Origin`` (:mod:`.origins`), the headers (:mod:`.headers`) and the token,
hands a websocket to :mod:`..connections` and an HTTP request to
:mod:`.http_api`, whose answers come from the read-only views of
:mod:`.status` and :mod:`.metrics`. :mod:`.tls` makes and loads the
server's certificate.

Imports the layers below it (connections, sessions, workers, scheduling,
gpus, store); nothing below imports it.
"""

__all__: list[str] = []
