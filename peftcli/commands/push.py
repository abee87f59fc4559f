"""`peft push RUN REPO_ID [--private]`: upload a run's adapter folder (the adapter, its model card
README.md, labels and tokenizer) to a model repo on the Hugging Face Hub, creating the repo if needed.

    peft push runs/lora-sst2 your-name/lora-sst2
    peft push runs/lora-sst2 your-org/lora-sst2 --private

It uploads with huggingface_hub (create_repo, then upload_folder: one commit) and loads no model: the
folder is sent as `peft train` wrote it. HF peft then loads it by id:
`PeftModel.from_pretrained(base, "your-name/lora-sst2")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import PeftcliError

CONFIG_NAME = "adapter_config.json"  # as peftcli.adapter_io names it; not imported: it imports torch
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
LOGIN = "Log in with `hf auth login` (a token with write access), or set HF_TOKEN"


def run_push(run: Path, repo_id: str, private: bool = False) -> str:
    """Uploads the adapter folder of `run` to `repo_id`; returns the commit's URL.

    Raises:
        PeftcliError: `run` holds no adapter, `repo_id` is not a repo id, there is no token, or the Hub
            refused the token, the repo or the upload.
    """
    from huggingface_hub import HfApi, get_token

    folder = adapter_folder(Path(run))
    check_repo_id(repo_id)
    token = get_token()  # HF_TOKEN, else the login `hf auth login` saved
    if token is None:
        raise PeftcliError(
            f"push: pushing to {repo_id} needs a Hugging Face login (got no HF_TOKEN and no saved token). {LOGIN}."
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        commit = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message="Upload the adapter of the peftcli run "
            f"{folder.parent.name if folder.name == 'adapter' else folder.name}",
        )
    except Exception as exc:  # the Hub's errors (HTTP, connection) become one line; others keep their traceback
        if not (is_hub_error(exc) or is_hub_error(exc.__cause__)):
            raise
        raise PeftcliError(refusal_line(exc, repo_id, folder)) from None
    print(f"pushed {folder} to {url} (commit {commit.oid[:7]}: {commit.commit_url})")
    return commit.commit_url


def adapter_folder(run: Path) -> Path:
    """The adapter folder to upload: RUN/adapter for a run directory, or RUN itself for an adapter folder."""
    if not run.exists():
        raise PeftcliError(
            f"{run}: not found. Give a run directory (peft train writes runs/<name>) or its adapter folder."
        )
    folder = run / "adapter" if (run / "adapter" / CONFIG_NAME).is_file() else run
    if not (folder / CONFIG_NAME).is_file():
        raise PeftcliError(
            f"{run}: not a run directory (no adapter/{CONFIG_NAME}) nor an adapter folder (no {CONFIG_NAME}). "
            "Give the folder `peft train` wrote, e.g. runs/<name>."
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise PeftcliError(
            f"{folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}; the adapter is incomplete. "
            "Train it again, or push a finished run."
        )
    return folder


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PeftcliError(
            f"push: REPO_ID is not a Hub repo id (got {repo_id!r}). "
            "Give your-name/repo-name (letters, digits, '-', '_', '.')."
        ) from None
    if repo_id.count("/") != 1:
        raise PeftcliError(
            f"push: REPO_ID names its owner too (got {repo_id!r}). Give your-name/{repo_id} or your-org/{repo_id}."
        )


def is_hub_error(exc: BaseException | None) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        from huggingface_hub.utils import httpx  # huggingface_hub 1.x and later: its HTTP client, whichever version

        transport: tuple[type[BaseException], ...] = (httpx.TransportError,)
    except ImportError:  # before 1.x it speaks requests, whose connection errors are OSErrors
        transport = (OSError,)
    return isinstance(exc, (HfHubHTTPError, *transport))


def refusal_line(exc: Any, repo_id: str, folder: Path) -> str:
    """The Hub's answer in one line: a token it refused (401), a namespace the token cannot write to
    (403), a model card whose metadata it refused (huggingface_hub checks it first, as a ValueError
    raised from the Hub's 400), or a Hub it cannot reach."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, ValueError):
        said = " ".join(str(exc).split())
        return (
            f"{folder / CARD_NAME}: the Hub refused the model card's metadata (got {said}). "
            "Fix the YAML between the --- lines, then push again."
        )

    if not isinstance(exc, HfHubHTTPError):
        return (
            f"push: cannot reach the Hub at {constants.ENDPOINT} (got {type(exc).__name__}: {exc}). "
            "Check the connection, or HF_ENDPOINT if you set it."
        )
    status = exc.response.status_code if exc.response is not None else None
    said = exc.server_message or str(exc).strip().splitlines()[0]
    if status == 401:
        return f"push: the Hub refused the token (got HTTP 401: {said}). {LOGIN}."
    if status == 403:
        owner = repo_id.split("/")[0]
        return (
            f"push: the token may not write to {repo_id} (got HTTP 403: {said}). "
            f"Use a token with write access to {owner!r}: {LOGIN[0].lower() + LOGIN[1:]}."
        )
    return (
        f"push: the Hub refused the upload to {repo_id} (got HTTP {status}: {said}). "
        f"Check the repo on {constants.ENDPOINT}/{repo_id}, then push again."
    )
