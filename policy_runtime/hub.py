"""Hugging Face Hub: `hf://owner/repo[@revision][/subdir]` paths wherever a checkpoint or export directory is read,
and `--push-to-hub REPO` for what training and export write.

huggingface_hub is optional on the robot side (it brings tqdm, httpx and a compiled hf-xet): the [train] extra
has it, a robot install adds the [hub] extra, and without it an hf:// path fails in one line naming that extra.
A download is served from the local Hugging Face cache when the Hub cannot be reached (HF_HUB_OFFLINE=1, no
route); a push needs the Hub, and when it fails the local directory, complete and untouched, is named in the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from policy_runtime.artifacts import LOCK_NAME, PROBE_PREFIX
from policy_runtime.errors import UserError

PREFIX = "hf://"
INSTALL_HINT = "pip install 'vla-rl-stack[hub]'"
FORM = "hf://owner/repo[@revision][/subdir]"
# Never uploaded: the output lock, write probes and half-written files.
NOT_PUSHED = [LOCK_NAME, f"{PROBE_PREFIX}*", "*.tmp", "**/*.tmp"]


@dataclass(frozen=True)
class HubPath:
    repo_id: str
    revision: str | None
    subdir: str


def is_hub_path(path: str | Path | None) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _hub(why: str) -> ModuleType:
    """huggingface_hub, or one line saying which extra brings it."""
    try:
        import huggingface_hub
    except ModuleNotFoundError as e:
        if e.name != "huggingface_hub":
            raise
        raise UserError(f"{why} needs huggingface_hub, which is not installed: {INSTALL_HINT}") from None
    return huggingface_hub


def _check_repo_id(repo_id: str, where: str) -> None:
    _hub(where)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None


def parse_hub_path(path: str) -> HubPath:
    """`hf://owner/repo[@revision][/subdir]`, checked without the network."""
    parts = path[len(PREFIX):].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UserError(f"{path} is not a Hub path: write {FORM}")
    name, at, revision = parts[1].partition("@")
    if at and not revision:
        raise UserError(f"{path}: the revision after @ is empty ({FORM})")
    sub = [p for p in parts[2:] if p]
    if any(p in (".", "..") for p in sub):
        raise UserError(f"{path}: the subdirectory may not contain . or .. ({FORM})")
    hub = HubPath(f"{parts[0]}/{name}", revision or None, "/".join(sub))
    _check_repo_id(hub.repo_id, path)
    return hub


def _unreachable() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    return f"the Hub at {constants.ENDPOINT} cannot be reached"


def local_dir(path: str | Path) -> Path:
    """The local directory `path` names: itself, or for an hf:// path its snapshot (downloaded, or from the cache)."""
    if not is_hub_path(path):
        return Path(path)
    hub = parse_hub_path(str(path))
    hf = _hub(f"the Hub path {path}")
    from huggingface_hub import errors

    try:
        root = hf.snapshot_download(hub.repo_id, revision=hub.revision,
                                    allow_patterns=[f"{hub.subdir}/*"] if hub.subdir else None)
    except errors.RepositoryNotFoundError:
        raise UserError(f"cannot download {path}: no Hub model repo {hub.repo_id} (or it is private: log in with "
                        "`hf auth login` or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"cannot download {path}: {hub.repo_id} has no revision {hub.revision}") from None
    except errors.LocalEntryNotFoundError:  # offline or no route, and no cached snapshot
        raise UserError(f"cannot download {path}: {_unreachable()} and it is not in the local Hugging Face "
                        "cache") from None
    except Exception as e:  # noqa: BLE001  (HTTP, TLS, disk: each ends in the same one line)
        raise UserError(f"cannot download {path}: {type(e).__name__}: {_first_line(e)}") from None
    local = Path(root) / hub.subdir
    if not local.is_dir():
        raise UserError(f"{path}: {hub.repo_id}{'@' + hub.revision if hub.revision else ''} has no directory "
                        f"{hub.subdir}")
    return local


def check_push_target(repo: str, flag: str = "--push-to-hub") -> None:
    """Before any work: the repo id is valid, huggingface_hub is installed, the Hub is not off, a token is set."""
    where = f"{flag} {repo}"
    if is_hub_path(repo):
        raise UserError(f"{where}: give the repo id (owner/name), not an {PREFIX} path")
    _check_repo_id(repo, where)
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}: HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it or leave out {flag} "
                        "(nothing was run)")
    if get_token() is None:
        raise UserError(f"{where} needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN "
                        "(nothing was run)")


def push_dir(folder: Path, repo: str, what: str) -> str:
    """Upload `folder` to the model repo `repo` (created private if new); returns the commit's URL.

    A failure is one line that says `folder` is complete on disk and how to push it later: the upload only reads.
    """
    hf = _hub("--push-to-hub")
    from huggingface_hub.utils import logging

    logging.set_verbosity_error()  # its retry warnings would be several lines; the failure below is one
    try:
        api = hf.HfApi()
        api.create_repo(repo, private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, ignore_patterns=NOT_PUSHED,
                                   commit_message=f"{what} from {folder.name}")
    except Exception as e:  # noqa: BLE001  (offline, no route, auth, quota: the local copy is kept in every case)
        raise UserError(f"could not push {what} to the Hub repo {repo} ({type(e).__name__}: {_first_line(e)}); "
                        f"the {what} in {folder} is "
                        f"complete on disk: push it later with `hf upload {repo} {folder}`") from None
    return str(commit.commit_url)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
