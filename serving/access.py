"""Who may do what: the optional service-wide API key, and each session's secret token.

A session's token is an HMAC of its id under the app's secret, so any ingress replica can
check it without asking anyone, a fork gets its own, and a token never reveals the
secret or another session's token. The secret comes from the app's arguments or the
``LONGLLAVA_SESSION_SECRET`` environment variable; without either, a random one is made
when the app is built, and tokens last until the app is deployed again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from .errors import AccessDeniedError, AuthenticationError

SECRET_ENV = "LONGLLAVA_SESSION_SECRET"
API_KEY_ENV = "LONGLLAVA_API_KEY"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class Access:
    def __init__(self, secret: str, api_key: str | None = None):
        self._key = hashlib.sha256(b"longllava session token\0" + secret.encode()).digest()
        self.api_key = api_key

    def token(self, session: str) -> str:
        mac = hmac.new(self._key, session.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def check_token(self, session: str, token: str | None) -> None:
        if not token:
            raise AuthenticationError("this session's token is missing: send it in the x-session-token header")
        if not hmac.compare_digest(token.encode(), self.token(session).encode()):
            raise AccessDeniedError("the x-session-token does not belong to this session")

    def check_api_key(self, authorization: str | None) -> None:
        """``Authorization: Bearer <key>`` when the app has an API key; anything goes otherwise."""
        if self.api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthenticationError("this server needs an API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise AccessDeniedError("the API key is not valid")
