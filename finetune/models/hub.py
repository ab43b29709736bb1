"""A checkpoint `path` (local folder or Hugging Face Hub id) turned into a local folder, or one line saying why not.

Families resolve the folder first and then call `from_pretrained` on it: given a Hub id that cannot be had,
transformers itself would try file after file (tokenizer, sentencepiece, tiktoken fallbacks), each waiting on the
network, and end minutes later in a traceback that names none of the real causes (a typo, no network, no access).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import UserError

_LOGIN_HINT = "or it is private/gated: log in with huggingface-cli login"


def looks_local(path: str) -> bool:
    """True for what can only be a filesystem path (a Hub id is `name` or `org/name`)."""
    return path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1 or path.endswith("/")


def _connection_errors() -> tuple[type[BaseException], ...]:
    # The HTTP client behind huggingface_hub changed across versions (requests, httpx, httpx2); only a client that
    # is imported can have raised, so look in sys.modules instead of importing any.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    clients = {"httpx2": ["TransportError"], "httpx": ["TransportError"], "requests": ["ConnectionError", "Timeout"]}
    for module, names in clients.items():
        if module in sys.modules:
            errors += [getattr(sys.modules[module], name) for name in names if hasattr(sys.modules[module], name)]
    return tuple(errors)


def _unreachable(error: BaseException | None) -> str:
    """Why the Hub could not be asked, for the message: offline mode, or the connection failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    cause = error.__cause__ if error is not None and error.__cause__ is not None else error
    if constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
        return "the Hub is offline (HF_HUB_OFFLINE=1)"
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    name = type(cause).__name__ if cause is not None else "no answer"
    return f"the Hub is unreachable ({constants.ENDPOINT}: {name}{': ' + detail if detail else ''})"


def resolve_checkpoint(
    path: str | Path, revision: str | None = None, *, allow_patterns: Sequence[str] | None = None
) -> Path:
    """The local folder of a checkpoint: `path` itself if it is a folder, else the Hub id's snapshot (downloaded,
    or from the cache) restricted to `allow_patterns`. Anything that cannot become a folder raises `UserError`
    with one line naming `path`, without retrying."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise UserError(f"{text}: not a checkpoint folder (it is a file)")
    if looks_local(text):
        raise UserError(f"{text}: checkpoint not found (no such folder)")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise UserError(
            f"{text}: checkpoint not found: neither a local folder nor a Hugging Face Hub id (org/name)"
        ) from None
    where = text if revision is None else f"{text} (revision {revision})"
    try:
        folder = snapshot_download(
            text, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except RevisionNotFoundError:
        raise UserError(f"{text}: no revision '{revision or 'main'}' on the Hugging Face Hub") from None
    except RepositoryNotFoundError:  # GatedRepoError is one
        raise UserError(f"{text}: no such model on the Hugging Face Hub ({_LOGIN_HINT})") from None
    except LocalEntryNotFoundError as err:
        # huggingface_hub >= 2 tells a partly cached snapshot apart (an older one returns the folder as is)
        if isinstance(err, getattr(hub_errors, "IncompleteSnapshotError", ())):
            raise UserError(
                f"{where}: only part of the checkpoint is in the Hugging Face cache, and {_unreachable(err)}"
            ) from None
        raise UserError(
            f"{where}: checkpoint not found locally or in the Hugging Face cache, and {_unreachable(err)}"
        ) from None
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in (401, 403):
            raise UserError(f"{text}: no access to this model on the Hugging Face Hub ({_LOGIN_HINT})") from None
        raise
    except _connection_errors() as err:  # e.g. a proxy error, which snapshot_download does not fall back on
        raise UserError(
            f"{where}: checkpoint not found locally or in the Hugging Face cache, and {_unreachable(err)}"
        ) from None
    return Path(folder)
