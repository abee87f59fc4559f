"""The Hugging Face Hub: the commit a model or dataset id resolves to, and the Hub's refusals as one line.

A run resolves each repo's revision (a branch, a tag, or the default `main`) to its commit once, loads
every file from that commit (the tokenizer and the weights, or the train and eval splits, cannot come
from two states of the repo) and records it in report.json, so the run can be repeated on the same
files. huggingface_hub keeps the revision -> commit mapping in its cache, so an offline run
(HF_HUB_OFFLINE=1) resolves it there; when neither the Hub nor the cache knows it, loading goes on with
the revision as given and the report records no commit.
"""

from __future__ import annotations

from peftcli.errors import PeftcliError, first_line

LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"
# (repo id, repo type, revision as given) -> the commit, for the process's life: one look-up a repo.
_commits: dict[tuple[str, str, str | None], str | None] = {}


def page(repo_id: str, repo_type: str) -> str:
    """The repo's page on the Hub in use (HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def resolve_commit(
    repo_id: str,
    repo_type: str,
    revision: str | None,
    key: str,
    offline: bool,
    error: type[PeftcliError] = PeftcliError,
) -> str | None:
    """The commit `revision` (None: the default branch) of a Hub repo points to, asked once a process.

    Raises:
        PeftcliError: the Hub answered that the repo, or the revision, does not exist (or is private).
    Returns None when the Hub cannot be reached (or `offline`) and the cache does not know the revision.
    """
    at = (repo_id, repo_type, revision)
    if at not in _commits:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            _commits[at] = ask_commit(repo_id, repo_type, revision, offline)
        except HfHubHTTPError as exc:
            raise error(
                refusal_line(exc, repo_id, repo_type, revision, key) or http_line(exc, repo_id, repo_type, key)
            ) from None
    return _commits[at]


def ask_commit(repo_id: str, repo_type: str, revision: str | None, offline: bool) -> str | None:
    """huggingface_hub's resolve_revision (2.x): the Hub's answer, else the cache's; None when neither
    knows. Before 2.x: the Hub's answer (repo_info), else None."""
    from huggingface_hub import HfApi

    api = HfApi()
    if hasattr(api, "resolve_revision"):
        from huggingface_hub.errors import RevisionResolutionError

        try:
            return api.resolve_revision(
                repo_id, repo_type=repo_type, revision=revision, local_files_only=offline
            ).resolved
        except RevisionResolutionError:
            return None
    if offline:
        return None
    try:
        return api.repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except (OSError, ConnectionError) as exc:  # requests' errors; an HTTP answer is an HfHubHTTPError
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):
            raise
        return None


def known_commit(repo_id: str | None, repo_type: str, revision: str | None) -> str | None:
    """The commit resolve_commit found for this repo and revision in this process, if it was asked."""
    return _commits.get((repo_id, repo_type, revision)) if repo_id else None


def refusal_line(exc: BaseException, repo_id: str, repo_type: str, revision: str | None, key: str) -> str | None:
    """What the Hub refused, as `<key>: ... (got ...). <fix>`, when `exc` (or an error it was raised
    from: transformers wraps the Hub's errors in an OSError) says the repo is gated, missing or lacks
    the revision; None for any other error."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = "dataset" if repo_type == "dataset" else "model"
    for error in chain(exc):
        if isinstance(error, GatedRepoError):  # a subclass of RepositoryNotFoundError: first
            return gated_line(repo_id, repo_type, key, error.response.status_code)
        if isinstance(error, RevisionNotFoundError):
            rev_key = key.rsplit(".", 1)[0] + ".revision"
            return (
                f"{rev_key}: the {what} {repo_id} has no branch, tag or commit {revision!r} (got {revision!r}). "
                f"Give one listed under Files and versions on {page(repo_id, repo_type)}, or remove {rev_key}."
            )
        if isinstance(error, RepositoryNotFoundError):
            return missing_line(repo_id, repo_type, key)
        if type(error).__name__ == "DatasetNotFoundError" and "gated" in str(error):
            # datasets re-raises the Hub's GatedRepoError as its own error, without the original.
            return gated_line(repo_id, repo_type, key, 401 if "authenticated" in str(error) else 403)
    return None


def missing_line(repo_id: str, repo_type: str, key: str) -> str:
    what = "dataset" if repo_type == "dataset" else "model"
    return (
        f"{key}: no {what} {repo_id} on the Hub, or it is private (got {repo_id!r}). Check the id on "
        f"{page(repo_id, repo_type)}; for a private repo, {LOGIN} with an account that can read it."
    )


def gated_line(repo_id: str, repo_type: str, key: str, status: int) -> str:
    """A gated repo: its files go to logged-in accounts that accepted its terms (401: no token was sent;
    403: the token's account has no access yet)."""
    what = "dataset" if repo_type == "dataset" else "model"
    if status == 401:
        return (
            f"{key}: {repo_id} is a gated {what}: the Hub gives its files only to a logged-in account that accepted "
            f"its terms (got no token). Accept them on {page(repo_id, repo_type)}, then {LOGIN}."
        )
    return (
        f"{key}: {repo_id} is a gated {what} and the account of your token has no access to it (got HTTP {status}). "
        f"Accept its terms on {page(repo_id, repo_type)} (the authors may have to approve the request), "
        "or set HF_TOKEN to a token of an account that has access."
    )


def http_line(exc: BaseException, repo_id: str, repo_type: str, key: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    first = first_line(exc, 200)
    fix = LOGIN[0].upper() + LOGIN[1:] if status == 401 else "Try again later, or check HF_ENDPOINT if you set it"
    return f"{key}: the Hub refused {repo_id} (got HTTP {status}: {first}). {fix}."


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the errors it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
