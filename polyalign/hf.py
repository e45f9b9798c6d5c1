"""Hugging Face plumbing around model loading: is the hub reachable, and quiet loading bars."""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within `timeout` s. Without a network the hub client
    retries for about a minute before failing; one quick probe lets the caller load from the local
    cache only (local_files_only) and fail at once instead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the client try
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # A thread bounds the DNS lookup too, which create_connection's timeout does not cover.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(answer and answer[0])


@contextmanager
def progress_bars(enabled: bool):
    """transformers' and the hub's progress bars ("Loading weights", downloads) off inside the block
    when `enabled` is false; the settings from before are restored afterwards."""
    if enabled:
        yield
        return
    import importlib

    from transformers.utils import logging as hf_logging

    hub_bars = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its tqdm class
    was_on, hub_states = hf_logging.is_progress_bar_enabled(), dict(hub_bars.progress_bar_states)
    hf_logging.disable_progress_bar()  # both libraries' bars
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        hub_bars.progress_bar_states.clear()
        hub_bars.progress_bar_states.update(hub_states)
