"""One Kafka connection config, adapted to each client library the workers use.

`KafkaSettings` (``PINFRESH_KAFKA__*``) says where the brokers are and how to
authenticate; these adapters turn it into keyword arguments for aiokafka
(admin, producers, consumers) and for Faust. Secrets are unwrapped here and
nowhere else.
"""

from __future__ import annotations

import ssl
from typing import Any

from streams.settings import KafkaSettings


def _ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(cafile=k.ssl_cafile)


def aiokafka_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of any aiokafka client."""
    out: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers,
                           "security_protocol": k.security_protocol}
    ctx = _ssl_context(k)
    if ctx is not None:
        out["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL"):
        out.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                   sasl_plain_password=k.sasl_password.get_secret_value()
                   if k.sasl_password else None)
    return out


def faust_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` for `faust.App`."""
    import faust

    out: dict[str, Any] = {
        "broker": [f"kafka://{h.strip()}" for h in k.bootstrap_servers.split(",")]}
    ctx = _ssl_context(k)
    if k.security_protocol.startswith("SASL"):
        out["broker_credentials"] = faust.SASLCredentials(
            username=k.sasl_username or "",
            password=k.sasl_password.get_secret_value() if k.sasl_password else "",
            mechanism=k.sasl_mechanism, ssl_context=ctx,
        )
    elif ctx is not None:
        out["broker_credentials"] = faust.SSLCredentials(ctx)
    return out
