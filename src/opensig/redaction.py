"""Keep secrets out of logs, reports and error messages.

A tracking URI may carry credentials (``http://user:password@host``, ``?token=...``), and
MLflow repeats the URI in its own error messages; whatever opensig logs, reports or
re-raises goes through ``redact`` first. No MLflow import here: config.py uses it too.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

# Values of these variables are secrets wherever they show up in a message.
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "DATABRICKS_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
)
MASK = "***"

_SECRET_NAME = re.compile(r"token|secret|passw|pwd|key|sig|auth|credential", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/?#\s@]+@", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&#\s]+)=)[^&#\s'\"]+")


def redact(text: str) -> str:
    """``text`` with URI credentials, secret query parameters and known secret values masked."""
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _QUERY_PARAM.sub(
        lambda m: m["head"] + MASK if _SECRET_NAME.search(m["name"]) else m[0], text
    )
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a one-letter "secret" would mask half the message
            text = text.replace(value, MASK)
    return text


def uri_credentials(uri: str) -> str | None:
    """What in ``uri`` is a credential ('a password', 'a token query parameter'), or None."""
    parts = urlsplit(uri)
    if parts.password is not None:
        return "a password (user:password@)"
    secret = [name for name, _ in parse_qsl(parts.query) if _SECRET_NAME.search(name)]
    return f"a secret query parameter ({', '.join(secret)})" if secret else None
