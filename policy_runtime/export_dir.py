"""Reading an export directory without torch: manifest checks, model hash, and the wire contract.

A robot-side host only has the export directory; everything it needs to serve and to agree with a client
comes from manifest.json, and a model file whose sha256 differs from the manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from policy_runtime.contract import MANIFEST_FILE, NORM_STATS_FILE, check_manifest_header, contract_from_manifest
from policy_runtime.errors import UserError


@dataclass(frozen=True)
class ExportDir:
    path: Path
    manifest: dict
    model_path: Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_export(path: str | Path, verify_hash: bool = True) -> ExportDir:
    """Load and verify an export directory; every problem is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"export {path} does not exist")
    if not path.is_dir():
        raise UserError(f"export {path} is a file, not an export directory")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise UserError(f"export {path} has no manifest.json")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"export {path}: manifest.json is not valid JSON ({str(e).splitlines()[0]})") from None
    check_manifest_header(manifest, f"export {path}")
    model_file = manifest.get("model_file")
    if not isinstance(model_file, str) or Path(model_file).name != model_file:
        raise UserError(f"export {path}: manifest model_file {model_file!r} is not a file name")
    model_path = path / model_file
    if not model_path.is_file():
        raise UserError(f"export {path}: model file {model_file} is missing")
    contract_from_manifest(manifest, "check", "none", where=str(path))  # fail now on missing/malformed fields
    if verify_hash:
        got = file_sha256(model_path)
        if got != manifest.get("model_sha256"):
            raise UserError(f"export {path}: {model_file} sha256 {got[:12]}... does not match the manifest's "
                            f"{str(manifest.get('model_sha256'))[:12]}... (corrupt or replaced file)")
        _verify_norm_stats(path, manifest)
    return ExportDir(path, manifest, model_path)


def _verify_norm_stats(path: Path, manifest: dict) -> None:
    """The normalisation file travels with the export; clients check its hash, so a missing or edited one is fatal."""
    norm = manifest["normalisation"]  # a map with a sha256: contract_from_manifest checked it
    name = norm.get("file", NORM_STATS_FILE)
    if not isinstance(name, str) or Path(name).name != name:
        raise UserError(f"export {path}: manifest normalisation file {name!r} is not a file name")
    if not (path / name).is_file():
        raise UserError(f"export {path}: {name} is missing (the manifest's normalisation hash refers to it)")
    got = file_sha256(path / name)
    if got != norm.get("sha256"):
        raise UserError(f"export {path}: {name} sha256 {got[:12]}... does not match the manifest's "
                        f"{str(norm.get('sha256'))[:12]}... (truncated or edited file)")
