"""pi0.5: pi0's backbone with the state in the prompt and flow time entering the expert through adaRMSNorm.

Prompt: "Task: {instruction}, State: {bins};\\nAction: " where the quantile-normalised state is cut into 256
bins over [-1, 1] (LeRobot 0.4.x pads the state to max_state_dim before cutting it; `state_prompt_dims` =
"robot" writes only the robot's dims, as openpi does). There is no state token; the action tokens are
action_in_proj(x), and swish(time_mlp_out(swish(time_mlp_in(sincos(tau))))) conditions every expert norm.

The state's part of the prompt is built inside `encode_prefix` from the state tensor: `tokenize` gives the
instruction's ids ("Task: ..., State:"), and a table bin -> token ids of " {bin}" plus the ids of ";\\nAction: "
(both made once from the tokenizer, checked to give the same ids as tokenising the whole prompt) complete it.
An exported graph therefore takes (images, state, instruction ids, noise) like every other backbone, and a robot
tokenises its instruction once. For a tokenizer the table does not fit (merges across a number's boundary) the
prompt is re-tokenised on the host instead: exact in torch, refused by the ONNX export.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from policy_runtime.contract import PROMPTS
from sim_trainer.models.vla.common import PaliGemmaFlowPolicy, VLAConfig, pad_last, sincos_time

NUM_BINS = 256
SUFFIX = ";\nAction: "


def discretize_state(state_normed: np.ndarray) -> np.ndarray:
    """256 bins over [-1, 1]: integers -1..255 (values below -1 give -1)."""
    return np.digitize(state_normed, bins=np.linspace(-1, 1, NUM_BINS + 1)[:-1]) - 1


def clean_instruction(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


def _plain(tokenizer):
    """A copy of the tokenizer without truncation or padding (tokenize() sets both on the original)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


class Pi05(PaliGemmaFlowPolicy):
    checkpoint_renames = {"action_time_mlp_in.": "time_mlp_in.", "action_time_mlp_out.": "time_mlp_out."}

    def __init__(self, cfg: VLAConfig, state_norm, action_norm, tokenizer=None):
        self.time_cond_dim = cfg.expert.width
        super().__init__(cfg, state_norm, action_norm, tokenizer)
        we = cfg.expert.width
        self.time_mlp_in = nn.Linear(we, we)
        self.time_mlp_out = nn.Linear(we, we)
        # the tables are not weights: not in the state dict
        table, valid, suffix, self.state_table_exact = self._state_tables(tokenizer)
        self.register_buffer("bin_ids", table, persistent=False)
        self.register_buffer("bin_valid", valid, persistent=False)
        self.register_buffer("suffix_ids", suffix, persistent=False)

    @staticmethod
    def _state_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Token ids of " {bin}" for bins -1..255 (row bin + 1, right-padded; `valid` marks real ids), of the
        prompt's end, and whether they compose exactly; empty without a tokenizer (a model built only to check a
        layout)."""
        if tokenizer is None:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0).long(), True
        tok = _plain(tokenizer)
        rows = [tok.encode(f" {b}", add_special_tokens=False).ids for b in range(-1, NUM_BINS)]
        width = max(len(r) for r in rows)
        table = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            table[i, :len(r)], valid[i, :len(r)] = torch.tensor(r, dtype=torch.long), True
        suffix = torch.tensor(tok.encode(SUFFIX, add_special_tokens=False).ids, dtype=torch.long)
        return table, valid, suffix, Pi05._split_is_exact(tok, rows, suffix.tolist())

    @staticmethod
    def _split_is_exact(tok, rows: list[list[int]], suffix: list[int]) -> bool:
        """Whether the table gives exactly the ids of tokenising the whole prompt (a tokenizer that merged across
        a number's boundary would not), on prompts holding every bin."""
        for bins in (list(range(-1, NUM_BINS)), list(range(NUM_BINS - 1, -2, -1))):
            head = "Task: pick up the cube, State:"
            whole = tok.encode(f"{head} {' '.join(map(str, bins))}{SUFFIX}").ids
            if whole != tok.encode(head).ids + [i for b in bins for i in rows[b + 1]] + suffix:
                return False
        return True

    def prompt(self, instructions: list[str]) -> list[str]:
        """The instruction's part of LeRobot's prompt; the state and the end are added in prompt_tokens."""
        return [PROMPTS["pi05"](t) for t in instructions]

    def full_prompt(self, instructions: list[str], state: torch.Tensor) -> list[str]:
        """LeRobot's whole prompt as text (what prompt_tokens builds as ids)."""
        bins = discretize_state(self._prompt_state(state).detach().cpu().double().numpy())
        return [f"Task: {clean_instruction(t)}, State: {' '.join(map(str, row))};\nAction: "
                for t, row in zip(instructions, bins, strict=True)]

    def _prompt_state(self, state: torch.Tensor) -> torch.Tensor:
        s = self.state_norm(state.float()).float()
        return pad_last(s, self.cfg.max_state_dim) if self.cfg.extra.get("state_prompt_dims", "padded") == "padded" \
            else s

    def prompt_tokens(self, text: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[instruction ids; " {bin}" ids per state dim; ";\\nAction: " ids], cut to max_text_len valid tokens
        (as the tokenizer truncates the whole prompt)."""
        if self.bin_ids.numel() == 0:
            raise ValueError("this model was built without a tokenizer")
        if not self.state_table_exact:
            return self._retokenized(text, state)
        s = self._prompt_state(state).double()
        edges = torch.linspace(-1, 1, NUM_BINS + 1, dtype=torch.float64, device=s.device)[:-1]  # as numpy's
        idx = (s[..., None] >= edges).sum(-1)  # bin + 1, in 0..256 (numpy's digitize, exportable)
        b = s.shape[0]
        ids = torch.cat([text, self.bin_ids[idx].flatten(1), self.suffix_ids.expand(b, -1)], 1)
        valid = torch.cat([text != self.cfg.pad_token_id, self.bin_valid[idx].flatten(1),
                           torch.ones(b, self.suffix_ids.numel(), dtype=torch.bool, device=text.device)], 1)
        return ids, valid & (valid.long().cumsum(1) <= self.cfg.max_text_len)

    def _retokenized(self, text: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fallback for a tokenizer the table does not fit: decode the instruction's ids (the tokenizer's decoder
        gives its text back) and tokenise the whole prompt on the host (not part of an exportable graph)."""
        tok = self.tokenizer
        heads = tok.decode_batch(text.tolist(), skip_special_tokens=True)
        bins = discretize_state(self._prompt_state(state).detach().cpu().double().numpy())
        tok.enable_truncation(self.cfg.max_text_len)
        tok.enable_padding(length=self.cfg.max_text_len, pad_id=self.cfg.pad_token_id, direction="right")
        enc = tok.encode_batch([f"{h} {' '.join(map(str, row))}{SUFFIX}" for h, row in zip(heads, bins, strict=True)])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=text.device)
        return ids, ids != self.cfg.pad_token_id

    def action_tokens(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        t = sincos_time(tau, a.shape[-1], self.cfg.min_period, self.cfg.max_period).to(self.time_mlp_in.weight.dtype)
        return a, F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(t))))
