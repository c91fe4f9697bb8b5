"""Hierarchical (coarse-to-fine) behaviour encoder: event, modality and user tokens (docs/design.md §1.2).

One adapter per modality maps event vectors to the LLM's hidden size; one shared modality adapter maps
each modality's masked mean; one user adapter maps the mean over the modalities a user actually has.
The tabular aggregate vector is projected by an MLP into a fixed number of token slots. Every soft token
is brought to the scale of the backbone's word embeddings, so the LLM sees inputs of the size it expects.

Two input scalings matter for what reaches the decoder (docs/design.md, "Representation quality"):
- `event_norm="split"` rescales an event vector's two parts before any adapter: the unit-norm text vector
  to unit RMS (x sqrt(D_text)) and each numeric field (log amount, log gap, recency) to zero mean and unit
  variance over the reference users. Raw, the text components are ~0.05 while log-amount is ~5, so the
  adapters' first LayerNorm sees mostly the numbers (text ~1% of the squared norm). `"none"` keeps raw inputs.
- `tabular_mode="split"` projects the aggregate vector into `tabular_slots` distinct tokens (one Linear
  output per slot) instead of one token repeated with slot offsets, so more of the profile survives the trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qanchor_lab.behaviour import NUMERIC_EVENT_FEATURES, UserBatch

EventNorm = Literal["none", "split"]
TabularMode = Literal["repeat", "split"]


class Adapter(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear, the authors' LLM adapter shape."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


@dataclass
class EncodedUser:
    """Soft tokens for B users; masks are True where a token is real."""

    user: torch.Tensor | None             # (B, 1, H)
    modality: torch.Tensor | None         # (B, M, H)
    modality_mask: torch.Tensor | None    # (B, M)
    events: dict[str, torch.Tensor]       # modality -> (B, N, H)
    event_masks: dict[str, torch.Tensor]  # modality -> (B, N)
    tabular: torch.Tensor | None          # (B, S, H)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, D) over positions where mask (B, N) is True; zeros for empty rows."""
    w = mask.to(x.dtype).unsqueeze(-1)                               # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)                  # (B, D)


class HierarchicalEncoder(nn.Module):
    def __init__(
        self,
        modalities: list[str],
        event_dim: int,
        tabular_dim: int,
        hidden_size: int,
        *,
        adapter_hidden: int = 512,
        tabular_slots: int = 2,
        use_user_token: bool = True,
        use_modality_tokens: bool = True,
        use_tabular: bool = True,
        embed_scale: float = 1.0,
        event_norm: EventNorm = "none",
        tabular_mode: TabularMode = "repeat",
    ):
        super().__init__()
        self.event_norm, self.tabular_mode = event_norm, tabular_mode
        n_num = len(NUMERIC_EVENT_FEATURES)
        self.text_dim = event_dim - n_num
        # Numeric event-field statistics of the reference users (set by QAnchorModel.from_data; saved with
        # the weights). Identity until set.
        self.register_buffer("numeric_mean", torch.zeros(n_num))
        self.register_buffer("numeric_std", torch.ones(n_num))
        self.modalities = list(modalities)
        self.use_user_token, self.use_modality_tokens, self.use_tabular = use_user_token, use_modality_tokens, use_tabular
        self.event_adapters = nn.ModuleDict({m: Adapter(event_dim, adapter_hidden, hidden_size) for m in self.modalities})
        if use_modality_tokens:
            self.modality_adapter = Adapter(event_dim, adapter_hidden, hidden_size)
            # Tokens of missing modalities are dropped from the sequence, so identity cannot come from order.
            self.modality_type = nn.Parameter(0.5 * torch.randn(len(self.modalities), hidden_size))
        if use_user_token:
            self.user_adapter = Adapter(event_dim, adapter_hidden, hidden_size)
        if use_tabular:
            self.tabular_slots = tabular_slots
            out = hidden_size * (tabular_slots if tabular_mode == "split" else 1)
            self.tabular_mlp = Adapter(tabular_dim, adapter_hidden, out)
            self.tabular_slot = nn.Parameter(0.5 * torch.randn(tabular_slots, hidden_size))
        self.register_buffer("embed_scale", torch.tensor(float(embed_scale)))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        # Unit-RMS tokens times the RMS of the word embeddings (adapter outputs are ~100x larger otherwise).
        return F.layer_norm(x, x.shape[-1:]) * self.embed_scale

    def set_numeric_stats(self, mean, std) -> None:
        """Standardisation of the numeric event fields used by event_norm="split"."""
        self.numeric_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.numeric_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-6))

    def normalize_events(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rescale raw event vectors (B, N, D) so text and numeric fields reach the adapters alike."""
        if self.event_norm == "none":
            return x
        text = x[..., : self.text_dim] * self.text_dim ** 0.5                  # (B, N, Dt) unit RMS
        num = (x[..., self.text_dim:] - self.numeric_mean) / self.numeric_std  # (B, N, 3) standardised
        return torch.cat([text, num], -1) * mask.unsqueeze(-1).to(x.dtype)    # (B, N, D) zeros at padding

    def forward(self, batch: UserBatch) -> EncodedUser:
        events, masks = {}, {}
        means = []
        for m in self.modalities:
            x, mask = batch.events[m], batch.masks[m]                 # (B, N, D), (B, N)
            x = self.normalize_events(x, mask)
            events[m] = self._scale(self.event_adapters[m](x))         # (B, N, H)
            masks[m] = mask
            means.append(masked_mean(x, mask))                         # (B, D)
        mod_vec = torch.stack(means, 1)                                # (B, M, D)
        present = torch.stack([masks[m].any(1) for m in self.modalities], 1)  # (B, M)

        modality = modality_mask = user = tabular = None
        if self.use_modality_tokens:
            modality = self._scale(self.modality_adapter(mod_vec)) + self.modality_type * self.embed_scale  # (B, M, H)
            modality_mask = present
        if self.use_user_token:
            user_vec = masked_mean(mod_vec, present)                   # (B, D) missing modalities left out
            user = self._scale(self.user_adapter(user_vec)).unsqueeze(1)  # (B, 1, H)
        if self.use_tabular:
            t = self.tabular_mlp(batch.tabular)                          # (B, H) or (B, S*H)
            t = self._scale(t.view(t.shape[0], -1, self.tabular_slot.shape[-1]))  # (B, 1 or S, H)
            tabular = t + self.tabular_slot * self.embed_scale           # (B, S, H)
        return EncodedUser(user, modality, modality_mask, events, masks, tabular)
