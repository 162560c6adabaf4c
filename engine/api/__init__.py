"""The daemon's HTTP API (aiohttp), the edge where typed outcomes become JSON.

``server`` holds the routes (``build_app``) and the listeners (``start_listeners``: a unix
socket, TCP with TLS and bearer tokens), ``models`` the request bodies (frozen msgspec
structs; unknown keys refused), ``openapi`` the description served at
``/v1/openapi.json``. A job's dict (``JobView.as_dict``) is the one ``engine.app.summaries``
built; snapshots and store usage are rendered here.

Above ``engine.daemon``: the handlers call the ``Service``; the daemon never imports this
package (``tessera run`` in ``engine.cli`` hands ``start_listeners`` to ``Service.run``).
"""
