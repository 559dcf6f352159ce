"""The only code that touches the network: fetching a checkpoint file by URL into the cache.

Used for ``model.checkpoint: https://…`` and for registry entries with a direct URL when
``model.pretrained: true``. Files land in ``$CAAT_PEFT_CACHE/checkpoints`` (default
``~/.cache/caat-peft/checkpoints/<hash of the URL>/<file name>``: two sources that publish files
of the same name never share a cache entry) and are then read like any local file (weights only).
A file already there is reused, so a second run works offline. Tested against a server on the
loopback interface (``tests/models/test_models_download.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from caat_peft.errors import UserError


def is_url(text: str | None) -> bool:
    return bool(text) and urlparse(str(text)).scheme in ("http", "https")


def checkpoint_cache() -> Path:
    if "CAAT_PEFT_CACHE" in os.environ:
        base = Path(os.environ["CAAT_PEFT_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caat-peft"
    return base / "checkpoints"


def fetch(url: str, *, progress: bool = True) -> Path:
    """The cached copy of ``url``, downloaded first if missing (atomically: no partial files)."""
    name = Path(urlparse(url).path).name or "checkpoint.pth"
    target = checkpoint_cache() / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file():
        return target
    legacy = checkpoint_cache() / name  # where versions up to 0.1.0 kept it: still offline
    if legacy.is_file():
        return legacy
    target.parent.mkdir(parents=True, exist_ok=True)
    from torch.hub import download_url_to_file

    # One partial file per process: several ranks of a launch may fetch at once; the renames
    # are atomic and the last one wins with identical bytes.
    partial = target.with_name(f".{name}.{os.getpid()}.partial")
    try:
        download_url_to_file(url, str(partial), progress=progress)
    except Exception as exc:  # urllib raises many types; the user's fix is the same
        partial.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({type(exc).__name__}: {str(exc)[:120]}); download it "
            "yourself and set model.checkpoint to the file"
        ) from None
    partial.replace(target)
    return target
