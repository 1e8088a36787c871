"""Push a verified guarded folder to the Hugging Face Hub with huggingface_hub's own API.

The token comes from where huggingface_hub looks (HF_TOKEN, the stored login); this module
never reads, prints, logs or writes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, VlmguardError
from .hub_client import _CONNECT_ENV, _READ_ENV, bound_hub_calls, timeouts
from .verify import verify

log = logging.getLogger(__name__)


class PushError(VlmguardError):
    """The Hub refused or could not be reached; one line, no token in it."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    changed: bool  # False when the Hub already had every file


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"bad --repo-id {repo_id!r}: {str(exc).splitlines()[0]}") from exc
    if repo_id.count("/") != 1:
        raise InputError(f"bad --repo-id {repo_id!r}: write it as ORG/NAME (or USER/NAME)")


def push(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Verify ``folder``, create the repo (and branch) if needed, upload the whole folder."""
    check_repo_id(repo_id)
    report = verify(folder)
    if not report.ok:
        raise InputError(
            f"refusing to push {folder}: verify found {len(report.problems)} problem(s), the "
            f"first: {report.problems[0]} (run `vlmguard-edit verify {folder}`)"
        )
    from huggingface_hub import HfApi, constants

    bound_hub_calls()
    api = HfApi()
    branch = revision or "main"
    message = commit_message or f"Upload VLM-Guard guarded checkpoint ({report.summary})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = _head(api, repo_id, branch)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message
        )
    except Exception as exc:  # every failure becomes one line (the token is in no message)
        raise PushError(_explain(exc, repo_id, constants.ENDPOINT)) from exc
    changed = info.oid != before
    return PushResult(repo_id, branch, info.commit_url, changed)


def preflight(repo_id: str) -> str:
    """What --push-to-hub checks before converting: offline mode, that the Hub answers, that
    the token is valid and may write, and that its owner may create repos in the namespace.
    Returns the account name."""
    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to push")
    bound_hub_calls()
    try:
        me = HfApi().whoami()
    except Exception as exc:
        raise PushError(_explain(exc, repo_id, constants.ENDPOINT)) from exc
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(
            f"the token of {me.get('name')} is read-only: use a token with write access to "
            f"push to {repo_id}"
        )
    namespace = repo_id.split("/")[0]
    names = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    if role != "fineGrained" and namespace not in names:
        raise PushError(
            f"{me.get('name')} cannot create repos in {namespace} (the token's account is in "
            f"{', '.join(sorted(n for n in names if n))}); choose a namespace of yours"
        )
    return str(me.get("name"))


def _head(api, repo_id: str, branch: str) -> str | None:
    try:
        return api.repo_info(repo_id, revision=branch).sha
    except Exception:  # a brand-new repo may have no commit to show yet
        return None


def _explain(exc: Exception, repo_id: str, endpoint: str) -> str:
    """One clear line for the failures users meet (auth, permission, missing, offline)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to push"
    if isinstance(exc, LocalTokenNotFoundError):
        return (
            "no Hugging Face token: set HF_TOKEN to a token with write access or run "
            "`hf auth login`"
        )
    timeout = _timeout_kind(exc)
    if timeout:
        connect, read = timeouts()
        if timeout == "connect":
            return (
                f"could not connect to the Hub at {endpoint} within {connect:g} s (connect "
                f"timeout; {_CONNECT_ENV} sets it): check the network (or HF_ENDPOINT)"
            )
        return (
            f"the Hub at {endpoint} did not answer within {read:g} s (read timeout; "
            f"{_READ_ENV} sets it)"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return (
                f"the Hub at {endpoint} rejected the credentials (401): set HF_TOKEN to a token "
                "with write access or run `hf auth login`"
            )
        if status == 403:
            return (
                f"no permission to write to {repo_id} (403): use a token with write access to "
                "that user or organisation"
            )
        if status == 404:
            return f"{repo_id} or its revision was not found on {endpoint} (404)"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the Hub answered {status} for {repo_id}: {first}"
    if _is_connection_error(exc):
        return f"cannot reach the Hub at {endpoint}: check the network (or HF_ENDPOINT)"
    return f"push failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _timeout_kind(exc: BaseException) -> str | None:
    """'connect' or 'read' when a client timeout is in the exception's chain."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if name == "ConnectTimeout":
            return "connect"
        if name.endswith("Timeout") or isinstance(seen, TimeoutError):
            return "read"
        seen = seen.__cause__ or seen.__context__
    return None


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import httpx

        kinds: tuple[type[BaseException], ...] = (httpx.TransportError, ConnectionError)
    except ImportError:  # huggingface_hub < 1.0 uses requests, whose errors are OSErrors
        kinds = (ConnectionError,)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
