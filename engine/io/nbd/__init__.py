"""NBD: the sans-IO protocol (``protocol``, ``handshake``, ``transmission``) and its asyncio
client (``client``, over ``connection``: the BufferedProtocol that drives the sans-IO machines).
Errors are in ``errors``. The server side: ``server`` (sans-IO, STARTTLS included), served
over asyncio by ``serve``, with its TLS files and context in ``tls``.

``connect(address, export_name, meta_contexts, tls=ssl_context)`` → ``NbdClient`` with ``read``,
``readinto``, ``write``, ``write_zeroes``, ``flush``, ``block_status`` and ``close``;
``extents(client, offset, length, context)`` walks block status over a whole range.
"""

from engine.io.nbd.client import NbdClient, connect, extents

__all__ = ["NbdClient", "connect", "extents"]
