"""Endpoint URLs are checked at attach: a typo fails loudly once, not silently at every send."""
from __future__ import annotations

from urllib.parse import urlparse


def check_http_url(option: str, url: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a host."""
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{option}={url!r} must be an http(s) URL such as 'http://127.0.0.1:9093'")
