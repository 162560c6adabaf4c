"""The engine's SSO endpoints, as the SDK uses them (API-NOTES § 2.1–2.2).

    client                                   fake engine
      POST /ovirt-engine/sso/oauth/token     form: grant_type=password, scope=ovirt-app-api,
                                                   username, password
        ← 200 {"access_token", "scope", "exp", "token_type": "bearer"}
        ← 400 {"error_code": "access_denied", "error": "Cannot authenticate user …"}
      GET/POST /ovirt-engine/api/…           Authorization: Bearer <access_token>
      POST /ovirt-engine/services/sso-logout form: scope, token   ← 200 {}

The SDK ignores the HTTP status of SSO answers: it raises ``AuthError`` when the JSON has an
``error`` key, and a generic ``Error`` when the body is not JSON, so every answer here is JSON.
Tokens do not expire on their own; ``Sessions.revoke_all`` simulates expiry (the SDK then
gets a 401, logs in again and retries the request once).
"""

import secrets
import time
from collections.abc import Callable

from aiohttp import web

TOKEN_TTL = 10 * 3600  # seconds; only reported in "exp", the fake never expires tokens itself
SCOPE = "ovirt-app-api"


class Sessions:
    """Valid access tokens and whom they belong to. Not thread-safe: use on the loop only."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username
        self._password = password
        self._tokens: dict[str, str] = {}

    def login(self, username: str, password: str) -> str | None:
        """A new token, or None when the credentials are wrong."""
        ok_user = secrets.compare_digest(username.encode(), self._username.encode())
        ok_password = secrets.compare_digest(password.encode(), self._password.encode())
        if not (ok_user and ok_password):
            return None
        token = secrets.token_urlsafe(32)
        self._tokens[token] = username
        return token

    def user(self, token: str) -> str | None:
        return self._tokens.get(token)

    def revoke(self, token: str) -> None:
        self._tokens.pop(token, None)

    def revoke_all(self) -> None:
        self._tokens.clear()

    def __len__(self) -> int:
        return len(self._tokens)


def _sso_error(code: str, message: str) -> web.Response:
    # The engine answers 400 with this shape for scope ovirt-app-api (SsoService).
    return web.json_response({"error_code": code, "error": message}, status=400)


def routes(sessions: Sessions, clock: Callable[[], float] = time.time) -> list[web.RouteDef]:
    """The SSO routes, bound to ``sessions``; ``clock`` gives epoch seconds for ``exp``."""

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        scope = str(form.get("scope", SCOPE))
        if grant_type != "password":
            return _sso_error("unsupported_grant_type", f"grant type {grant_type!r}")
        username = str(form.get("username", ""))
        access_token = sessions.login(username, str(form.get("password", "")))
        if access_token is None:
            return _sso_error(
                "access_denied",
                f"Cannot authenticate user '{username}': The username or password is incorrect.",
            )
        exp_ms = int((clock() + TOKEN_TTL) * 1000)
        return web.json_response(
            {
                "access_token": access_token,
                "scope": scope,
                "exp": str(exp_ms),
                "token_type": "bearer",
            }
        )

    async def logout(request: web.Request) -> web.Response:
        form = await request.post()
        sessions.revoke(str(form.get("token", "")))
        return web.json_response({})

    return [
        web.post("/ovirt-engine/sso/oauth/token", token),
        web.post("/ovirt-engine/services/sso-logout", logout),
    ]
