"""The Hugging Face Hub, asked cheaply: offline switches, one reachability probe, cached config lookup.

Why: on a machine without network huggingface_hub retries each file for ~25 s; every Hub access in
difflm goes through `hub_local_only()` first, so such a machine gets a one-line error in seconds.
"""

from __future__ import annotations

import os
import re
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from difflm.errors import ConfigError, first_line

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_offline() -> bool:
    """True when the Hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub endpoint (cached), so that a machine without network gets a
    clear error in seconds instead of huggingface_hub's retry loop (~25 s per file). With a proxy
    configured we cannot tell cheaply, so we assume it is reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def hub_local_only() -> bool:
    """True when only the local Hugging Face cache may be used (the Hub is offline or unreachable)."""
    return hub_offline() or not hub_reachable()


def looks_like_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repository id ("org/name" or "name"), not a path."""
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "~"))


def hub_config_file(name: str) -> str:
    """config.json of a Hub model: from the local cache, else downloaded when the Hub is usable."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name, "config.json", local_files_only=True)
    except Exception:
        pass
    if hub_offline():
        raise ConfigError(
            f"model {name!r} is not a local folder nor in the Hugging Face cache, "
            "and the Hub is offline (HF_HUB_OFFLINE=1)",
            key="model",
        )
    if not hub_reachable():
        raise ConfigError(
            f"model {name!r} is not a local folder nor in the Hugging Face cache, and the Hub is unreachable",
            key="model",
        )
    try:
        return hf_hub_download(name, "config.json")
    except Exception as err:
        raise ConfigError(
            f"cannot fetch model {name!r} from the Hugging Face Hub: {first_line(err)}", key="model"
        ) from None


@contextmanager
def hub_errors(name: str, what: str = "model"):
    """Turn transformers'/the Hub's OSErrors (missing file, offline cache miss) into one-line errors."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"cannot load {what} {name!r}: {first_line(err)}", key=what) from None
