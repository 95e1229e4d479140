"""Label values every exporter can encode.

A model name can come from a directory name that is not valid UTF-8: ``os.fsdecode`` keeps each
undecodable byte as a lone surrogate (``b"caf\\xe9"`` -> ``"caf\\udce9"``), which no UTF-8 encoder
accepts, so one such name made every scrape fail. Such characters are written out instead:
an undecodable byte as ``\\xNN`` (``/models/caf\\xe9``, what ``ls`` shows), any other lone
surrogate as ``\\uNNNN``. Valid text is returned unchanged.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)  # the same few label values every scrape
def encodable(value: str) -> str:
    """``value`` as text that encodes to UTF-8."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    out = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of one undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
