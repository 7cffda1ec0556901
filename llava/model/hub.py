"""Where a model name points, resolved as transformers resolves it: a local folder, else a
hub id, taken from the local Hugging Face cache when offline (``HF_HUB_OFFLINE=1``, the
usual state of a GPU node) and downloaded otherwise.

One function, :func:`resolve_pretrained`, for the checkpoint, the LoRA / projector base, the
tokenizer (which lives in one of those) and the vision tower.
"""

from __future__ import annotations

import logging
import os

from ..cli import InputError

logger = logging.getLogger(__name__)

__all__ = ["ResolutionError", "hub_offline", "looks_like_hub_id", "resolve_pretrained"]


class ResolutionError(InputError, FileNotFoundError):
    """A model name that is neither a local folder nor a reachable hub repository."""


def hub_offline() -> bool:
    """Whether the hub may not be contacted (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: no path prefix, at most one slash, no empty part."""
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def resolve_pretrained(
    name: str, what: str, relative_to: tuple[str | None, ...] = (), cache_dir: str | None = None,
    local_only: bool = False,
) -> str:
    """The local folder ``name`` stands for.

    Tried in order: ``name`` as a folder relative to each of ``relative_to`` (a tower saved
    beside its checkpoint), ``name`` as a folder (absolute or relative to the working
    directory), the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir``) and,
    when online and not ``local_only``, a download. ``what`` names the role in the error
    (``"model path"``, ...).
    """
    name = os.path.expanduser(name)
    if not os.path.isabs(name):
        for directory in relative_to:
            if directory and os.path.isdir(os.path.join(directory, name)):
                return os.path.join(directory, name)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ResolutionError(f"{what} {name!r} is a file, not a model folder")
    if not looks_like_hub_id(name):
        raise ResolutionError(f"{what} {name!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline() or local_only
    try:
        path = snapshot_download(name, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        raise ResolutionError(
            f"{what} {name!r} is neither a local folder nor in the Hugging Face cache "
            f"({cache_dir or constants.HF_HUB_CACHE})" + (" and the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "")
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise ResolutionError(f"{what} {name!r} is not a local folder and could not be fetched from the hub: {error}") from None
    if offline:
        logger.info("%s %s: from the Hugging Face cache, %s", what, name, path)
    return path
