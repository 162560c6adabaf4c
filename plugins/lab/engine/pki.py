"""The engine's CA certificate, published as the real engine publishes it.

    GET /ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA
      ← 200 application/x-x509-ca-cert, the CA certificate in PEM

No token is needed (the real engine serves it to anyone: hosts and clients fetch it before
they trust anything). It is the CA that signed the engine's HTTPS certificate and every
imageio daemon's (``plugins.lab.tls``). Other resources or formats answer 400.
"""

from aiohttp import web

PATH = "/ovirt-engine/services/pki-resource"
CA_QUERY = {"resource": "ca-certificate", "format": "X509-PEM-CA"}


def routes(ca_pem: bytes) -> list[web.RouteDef]:
    async def pki_resource(request: web.Request) -> web.Response:
        resource = request.query.get("resource")
        fmt = request.query.get("format")
        if (resource, fmt) != (CA_QUERY["resource"], CA_QUERY["format"]):
            return web.Response(
                status=400, text=f"unsupported resource {resource!r} in format {fmt!r}\n"
            )
        return web.Response(body=ca_pem, content_type="application/x-x509-ca-cert")

    return [web.get(PATH, pki_resource)]
