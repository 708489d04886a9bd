"""The state a trainer resumes from: `<stem>.safetensors` (tensors, no pickle) and `<stem>.json` (counters, config).

Each file is written atomically; both carry one random token, so a pair torn by a crash between the two
writes is refused instead of resuming weights from one save with the counters of another. A resume is
refused with one line when the state is unreadable or the run asks for something else than the one saved.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from policy_runtime.artifacts import atomic_write_bytes, atomic_write_text
from sim_trainer.errors import UserError


def save_state(out: Path, stem: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    token = uuid.uuid4().hex
    atomic_write_bytes(out / f"{stem}.safetensors", save(tensors, metadata={"token": token}))
    atomic_write_text(out / f"{stem}.json", json.dumps({**meta, "token": token}))


def read_meta(out: Path, stem: str) -> dict:
    path = out / f"{stem}.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot resume from {out}: {path.name} is unreadable ({_first_line(e)})") from None
    if not isinstance(meta, dict):
        raise UserError(f"cannot resume from {out}: {path.name} is not a JSON object")
    return meta


def load_state(out: Path, stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = read_meta(out, stem)
    path = out / f"{stem}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            token = (f.metadata() or {}).get("token")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot resume from {out}: {path.name} is unreadable ({_first_line(e)})") from None
    if meta.get("token") != token:
        raise UserError(f"cannot resume from {out}: {stem}.json and {path.name} come from different saves "
                        "(a save was interrupted)")
    return meta, tensors


@contextmanager
def applying(out: Path) -> Iterator[None]:
    """Loading a saved state into the model and optimiser: a state that does not fit is one line, not a trace."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"cannot resume from {out}: its saved state does not fit this run "
                        f"({_first_line(e)[:200]})") from None


def check_same_run(out: Path, saved: dict, now: dict, keys: tuple[str, ...], path_keys: tuple[str, ...] = ()) -> None:
    """Refuse to resume a run whose saved config differs from this one in a key that defines the run."""
    for key in keys:
        was, is_ = saved.get(key), now.get(key)
        if key in path_keys:
            was, is_ = _resolved(was), _resolved(is_)
        if was != is_:
            raise UserError(f"cannot resume {out}: it was run with {key}={saved.get(key)!r}, this run has "
                            f"{key}={now.get(key)!r}; resume with the same {key} or choose a new --out")


def save_training(out: Path, stem: str, meta: dict, opt: torch.optim.Optimizer,
                  **parts: dict[str, torch.Tensor]) -> None:
    """One resumable save: `meta` (JSON), the optimiser's moments and named tensor parts (weights, ema, rng ...).

    Each part is stored as `<part>/<key>`, the optimiser as `opt/<param>/<moment>` with its param groups in meta.
    """
    tensors = {f"{part}/{k}": v.detach().contiguous() for part, sd in parts.items() for k, v in sd.items()}
    sd = opt.state_dict()
    tensors |= {f"opt/{i}/{name}": torch.as_tensor(v).contiguous()
                for i, st in sd["state"].items() for name, v in st.items()}
    save_state(out, stem, {**meta, "param_groups": sd["param_groups"]}, tensors)


def load_training(out: Path, stem: str, opt: torch.optim.Optimizer) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """What save_training wrote: its meta and parts ({part: {key: tensor}}); the optimiser is restored here."""
    meta, tensors = load_state(out, stem)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        part, _, name = key.partition("/")
        parts.setdefault(part, {})[name] = v
    state: dict[int, dict] = {}
    with applying(out):
        for key, v in parts.pop("opt", {}).items():
            i, name = key.split("/", 1)
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta, parts


def _resolved(v: object) -> object:
    if isinstance(v, str):
        return str(Path(v).resolve())
    if isinstance(v, list):
        return [_resolved(x) for x in v]
    return v


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
