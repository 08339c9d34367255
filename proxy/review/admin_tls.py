"""TLS for the admin plane (``admin.tls_cert`` / ``admin.tls_key``): tokens and session cookies
then never cross the network in clear, and the session cookie is marked ``Secure``."""

from __future__ import annotations

import ssl

from ..errors import ConfigError
from ..settings import AdminSettings


def admin_ssl_context(admin: AdminSettings) -> ssl.SSLContext | None:
    """The server context for the admin site, or None to serve plain HTTP."""
    if admin.tls_cert is None or admin.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(admin.tls_cert, admin.tls_key)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"admin.tls_cert / admin.tls_key: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"admin.tls_cert / admin.tls_key: not a usable PEM certificate and key "
            f"({admin.tls_cert}, {admin.tls_key}): {exc}"
        ) from None
    return context
