"""The Hugging Face hub probe, apart from model loading: does the hub answer, and is a model
already in the local cache. Model ids (krpo_cli.models) and dataset ids (krpo_cli.data) ask here
before the HF libraries would retry for most of a minute offline."""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from urllib.parse import urlparse

_switched_offline = False  # set when krpo itself turned offline mode on


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers; if it does not, the HF libraries are switched to their local caches.

    Without network, huggingface_hub retries every request five times with back-off, so a
    model that is already cached loads after ~50 s of retries and a screen of warnings; one
    TCP connection tells the same at once. It goes where the libraries' requests would go:
    to the proxy that the environment names for the endpoint's scheme (or ALL_PROXY), unless
    NO_PROXY exempts the endpoint. HF_HUB_OFFLINE=0 skips the probe.
    """
    global _switched_offline
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off"):
        return True  # the user says the hub is reachable
    endpoint = urlparse(constants.ENDPOINT)
    proxies = urllib.request.getproxies()  # ALL_PROXY appears as "all", which httpx also honours
    proxy = proxies.get(endpoint.scheme) or proxies.get("all", "")
    if proxy and urllib.request.proxy_bypass(endpoint.hostname or ""):
        proxy = ""
    target = urlparse(proxy if "://" in proxy else f"http://{proxy}") if proxy else endpoint
    try:
        socket.create_connection((target.hostname, target.port or (443 if target.scheme == "https" else 80)), timeout).close()
        return True
    except (OSError, ValueError):
        pass
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # for libraries imported later
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers at each request
    if "datasets.config" in sys.modules:  # datasets copies the flag when imported
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    _switched_offline = True
    from rich.console import Console

    Console(stderr=True).print(
        f"cannot reach {target.hostname}{' (the proxy)' if proxy else ''}: using the local Hugging Face cache only",
        highlight=False,
        markup=False,
    )
    return False


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError), so not cached either
        return False


def switched_offline() -> bool:
    """Whether krpo itself turned offline mode on (the hub did not answer), rather than the user."""
    return _switched_offline
