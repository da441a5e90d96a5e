"""Weights from the Hugging Face Hub: `hf-hub:ORG/NAME[@REVISION]` references, resolved to a local folder.

Design decisions:
- One function, `resolve_ref`, turns a reference into its snapshot folder in huggingface_hub's cache and passes
  any other path through, so every place that takes weights calls it first and then reads the folder as it
  reads a local one: format detection (convert.detect) and the readers are the same code for both.
- Downloads go through huggingface_hub's `snapshot_download`, so its cache (HF_HOME, HF_HUB_CACHE), offline
  mode (HF_HUB_OFFLINE), token and endpoint apply as in transformers and timm; nothing here reads them.
- Only the files a reader needs are fetched: the JSON descriptions and model.safetensors, and pytorch_model.bin
  only for a repo without safetensors (read with `weights_only=True` like any pickle); never the TensorFlow,
  Flax or ONNX copies that many repos also hold.
- Every failure is one MAEError line that says what went wrong and how to fix it: no network and no cached copy,
  no such repository or revision, no weights file in the repository.
- huggingface_hub is imported on the first reference only: `mae --help` and local paths never pay for it.
- This module imports only errors.py, so models.py (the bottom of the weights modules) can resolve references.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MAEError

PREFIX = "hf-hub:"
DESCRIPTIONS = ["config.json", "preprocessor_config.json", "model.json"]  # transformers', timm's, ours
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference


def is_ref(ref: str | Path) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """ "hf-hub:ORG/NAME@REVISION" -> ("ORG/NAME", "REVISION"); no @: the default branch (None)."""
    repo, at, revision = ref.removeprefix(PREFIX).partition("@")
    if not repo or (at and not revision):
        raise MAEError(f"{ref} is not a Hub reference; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def resolve_ref(ref: str | Path) -> Path:
    """A local path as it is; an `hf-hub:` reference as the local snapshot folder of its weights (downloaded
    once, then read from the cache)."""
    if not is_ref(ref):
        return Path(ref)
    repo, revision = parse_ref(ref)
    folder = download(ref, repo, revision, [*DESCRIPTIONS, WEIGHTS[0]])
    if not (folder / WEIGHTS[0]).exists():  # an older repo: its pickled copy (one more look-up, only then)
        folder = download(ref, repo, revision, [WEIGHTS[1]])
    if not any((folder / name).exists() for name in WEIGHTS):
        raise MAEError(
            f"{ref} holds no {' or '.join(WEIGHTS)} (sharded or TensorFlow-only repositories are not supported); "
            "download and convert it yourself"
        )
    return folder


def download(ref: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot folder of `repo` at `revision` holding the files that match `patterns`, as far as the repo
    has them; huggingface_hub's failures as one-line MAEErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (  # also exported here by older releases than huggingface_hub.errors
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise MAEError(f"{ref}: the repository {repo} has no revision {revision!r}; check the name after @") from None
    except RepositoryNotFoundError:  # gated and private repositories answer alike
        raise MAEError(
            f"{ref}: no repository {repo} on the Hub, or it is private or gated: check the name, or log in "
            "with `hf auth login`"
        ) from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and nothing (complete) in the cache
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network"
        fix = "unset HF_HUB_OFFLINE and connect once" if constants.HF_HUB_OFFLINE else "connect once"
        raise MAEError(
            f"cannot download {ref} ({why} and no cached copy in {constants.HF_HUB_CACHE}): {fix}, or pass a local path"
        ) from None
    except HFValidationError as e:
        raise MAEError(f"{ref} is not a Hub repository id: {str(e).splitlines()[0]}") from None
    except (HfHubHTTPError, OSError) as e:
        raise MAEError(f"cannot download {ref}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
