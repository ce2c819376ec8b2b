"""Images of a chat request: ``data:`` base64 URLs, and local files under the directories the server allows."""
from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from .protocol import ImagePart, bad


def load_image(part: ImagePart, allowed_local: list[Path]):
    """The RGB PIL image of ``part``. ``allowed_local``: resolved directories local paths (plain or ``file://``)
    must lie under; empty = no local files. Raises APIError (400) naming the part when the URL is not accepted or
    the bytes do not decode as an image."""
    from PIL import Image

    url = part.url
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise bad(f"'{part.param}': a data: URL must be base64 ('data:image/png;base64,...')", part.param)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"'{part.param}': the data: URL is not valid base64 ({e})", part.param) from None
        source = io.BytesIO(raw)
    else:
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            raise bad(f"'{part.param}': remote image URLs are not fetched by this server; send the image as a "
                      "data: URL ('data:image/png;base64,...')", part.param)
        path = unquote(urlparse(url).path) if scheme == "file" else url
        if scheme not in ("", "file") and not os.path.isabs(url):
            raise bad(f"'{part.param}': unsupported image URL scheme {scheme!r} (data: URLs and local paths)",
                      part.param)
        if not allowed_local:
            raise bad(f"'{part.param}': local image paths are disabled; start the server with "
                      "--allowed-local-media DIR to read images under DIR, or send a data: URL", part.param)
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in allowed_local):
            raise bad(f"'{part.param}': {path} is not under an allowed local media directory "
                      f"({', '.join(map(str, allowed_local))})", part.param)
        if not resolved.is_file():
            raise bad(f"'{part.param}': no image file at {path}", part.param)
        source = str(resolved)
    try:
        with Image.open(source) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise bad(f"'{part.param}': the image does not decode ({type(e).__name__}: {e})", part.param) from None
