"""Masking of passwords in URLs wherever the pipeline prints, logs or records them."""

from __future__ import annotations

import logging
import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]+)@")
_installed = False


def mask_secrets(text: str) -> str:
    """`scheme://user:password@host` becomes `scheme://user:***@host`, anywhere in the text."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def install_log_masking() -> None:
    """Masks URL passwords in every log record of this process, whichever logger or handler
    (Prefect's included) ends up writing it."""
    global _installed
    if _installed:
        return
    factory = logging.getLogRecordFactory()

    def masking_factory(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return record

    logging.setLogRecordFactory(masking_factory)
    _installed = True
