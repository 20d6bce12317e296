"""The Hugging Face hub probe, apart from model loading: does the hub answer, and is a model or
dataset already in the local cache. Model ids (krpo_cli.models) and dataset ids (krpo_cli.data) ask
here before the HF libraries would retry for most of a minute offline. Nothing here imports torch
or the HF model and dataset libraries, so `check_hub_sources` refuses a recipe that cannot run
offline within a second or two, before they load."""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from krpo_cli.errors import KrpoError

_switched_offline = ""  # the host that did not answer, once krpo itself turned offline mode on
_announced = False
PROBE_SECONDS = 1.5  # a hub that takes longer to accept a connection is taken as unreachable


class HubUnavailable(KrpoError):
    """A recipe needs a model or dataset from the hub, which cannot be reached, and it is not cached here."""


def connects(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds in all: the name lookup,
    which socket timeouts do not bound, included (it runs in a thread that is not waited for longer)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout).close()
            outcome.append(True)
        except (OSError, ValueError):
            outcome.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def hub_reachable(timeout: float = PROBE_SECONDS, announce: bool = True) -> bool:
    """Whether the hub answers; if it does not, the HF libraries are switched to their local caches.

    Without network, huggingface_hub retries every request five times with back-off, so a
    model that is already cached loads after ~50 s of retries and a screen of warnings; one
    TCP connection tells the same at once. It goes where the libraries' requests would go:
    to the proxy that the environment names for the endpoint's scheme (or ALL_PROXY), unless
    NO_PROXY exempts the endpoint. HF_HUB_OFFLINE=0 skips the probe. With `announce`, the switch
    to the local cache is said on stderr (a caller about to refuse leaves it to its one-line error).
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
    if connects(target.hostname, target.port or (443 if target.scheme == "https" else 80), timeout):
        return True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # for libraries imported later
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers at each request
    if "datasets.config" in sys.modules:  # datasets copies the flag when imported
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    _switched_offline = f"{target.hostname}{' (the proxy)' if proxy else ''}"
    if announce:
        announce_offline()
    return False


def announce_offline() -> None:
    """Say on stderr, once, that krpo switched the HF libraries to their local caches (when it did)."""
    global _announced
    if _switched_offline and not _announced:
        _announced = True
        from rich.console import Console

        Console(stderr=True).print(
            f"cannot reach {_switched_offline}: using the local Hugging Face cache only", highlight=False, markup=False
        )


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError), so not cached either
        return False


def switched_offline() -> bool:
    """Whether krpo itself turned offline mode on (the hub did not answer), rather than the user."""
    return bool(_switched_offline)


def missing_model_message(repo_id: str) -> str:
    """Why the hub model `repo_id` cannot be loaded here (asked once the hub proved unreachable)."""
    from huggingface_hub import constants

    why = "cannot reach the hub to download" if switched_offline() else "HF_HUB_OFFLINE is set, and cannot download"
    return (
        f"{why} '{repo_id}', and it is not in the local cache ({constants.HF_HUB_CACHE}); "
        "download it on a machine with network, or give a local directory"
    )


def missing_dataset_message(repo_id: str) -> str:
    return (
        f"cannot reach the hub to fetch '{repo_id}' and it is not in the local cache; "
        "save it as a JSONL/Parquet/CSV file and set data.source=file data.path=FILE"
    )


def datasets_offline() -> bool:
    """HF_DATASETS_OFFLINE set by the user (or by krpo once the hub did not answer)."""
    return os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def dataset_maybe_cached(repo_id: str) -> bool:
    """Whether a copy of the hub dataset `repo_id` may be here: a local folder of that name, a prepared
    copy in the datasets cache, or a download in the hub cache. False means it surely is not."""
    from huggingface_hub import constants

    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    places = (
        Path(repo_id).expanduser(),
        Path(datasets_cache).expanduser() / repo_id.replace("/", "___"),
        Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}",
    )
    return any(place.exists() for place in places)


def plain_hub_id(name: str) -> bool:
    """A model name that can only mean a hub repository: "namespace/name", which is no file or folder
    here (nor under a folder ./namespace), and no .gguf file. (Other names are resolved by krpo_cli.models.)"""
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", part) for part in parts)
        and not name.endswith(".gguf")
        and not os.path.exists(name)
        and not os.path.isdir(parts[0])
    )


def check_hub_sources(recipe) -> None:
    """Refuse at once a recipe whose hub dataset or hub model is neither reachable nor cached (before
    torch and the HF libraries take seconds to import). A source that may be cached is left to the
    libraries, which know their caches exactly."""
    data, model = recipe.data, recipe.model.name_or_path
    needs_dataset = data.source == "hub" and not dataset_maybe_cached(data.path)
    needs_model = plain_hub_id(model)
    if not (needs_dataset or needs_model):
        return
    if needs_dataset and (datasets_offline() or not hub_reachable(announce=False)):
        raise HubUnavailable(missing_dataset_message(data.path))
    if needs_model:
        check_hub_model(model)
    announce_offline()  # not refused: the run goes on from the local cache


def check_hub_model(name: str) -> None:
    """Refuse at once a hub model id (`krpo eval`'s target, a recipe's model) that cannot be downloaded
    and is not cached (a refusal is its one line); anything else (a folder, a run, an embedded model's
    name) is left to load."""
    if plain_hub_id(name) and not hub_reachable(announce=False) and not in_hub_cache(name):
        raise HubUnavailable(missing_model_message(name))
    announce_offline()
