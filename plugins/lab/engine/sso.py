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

Tokens expire as the engine's sessions do: after ``idle_timeout`` seconds without a request
(the engine's ``UserSessionTimeOutInterval``, 30 minutes) and at the latest ``lifetime``
seconds after login (``UserSessionHardLimit``, 600 minutes; the ``exp`` the token answer
reports). An expired token gets the same 401 as an unknown one; the SDK then logs in again and
retries the request once (API-NOTES § 1.2). ``Sessions.revoke_all`` expires every token now.
"""

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

IDLE_TIMEOUT = 30 * 60.0  # seconds; the engine's UserSessionTimeOutInterval default
LIFETIME = 600 * 60.0  # seconds; the engine's UserSessionHardLimit default
SCOPE = "ovirt-app-api"


@dataclass(slots=True)
class _Session:
    user: str
    born: float  # monotonic seconds
    last_used: float


class Sessions:
    """Valid access tokens and whom they belong to. Not thread-safe: use on the loop only.

    ``idle_timeout``, ``lifetime`` (seconds, > 0) and ``clock`` (monotonic seconds) are knobs
    a test may change at any time, on the loop: they apply to every token at its next use."""

    def __init__(
        self,
        username: str,
        password: str,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        lifetime: float = LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_timeout <= 0 or lifetime <= 0:
            raise ValueError(
                f"SSO idle timeout {idle_timeout} s and lifetime {lifetime} s must be positive"
            )
        self._username = username
        self._password = password
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.clock = clock
        self._tokens: dict[str, _Session] = {}
        self.expired = 0  # tokens that expired so far (tests read it)

    def login(self, username: str, password: str) -> str | None:
        """A new token, or None when the credentials are wrong."""
        ok_user = secrets.compare_digest(username.encode(), self._username.encode())
        ok_password = secrets.compare_digest(password.encode(), self._password.encode())
        if not (ok_user and ok_password):
            return None
        token = secrets.token_urlsafe(32)
        now = self.clock()
        self._tokens[token] = _Session(username, now, now)
        return token

    def user(self, token: str) -> str | None:
        """Whose token this is, or None if it is unknown, revoked or expired; a use of a
        live token restarts its idle time."""
        session = self._tokens.get(token)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_used >= self.idle_timeout or now - session.born >= self.lifetime:
            del self._tokens[token]
            self.expired += 1
            return None
        session.last_used = now
        return session.user

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
        exp_ms = int((clock() + sessions.lifetime) * 1000)
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
