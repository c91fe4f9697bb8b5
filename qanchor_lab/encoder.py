"""Hierarchical (coarse-to-fine) behaviour encoder: event, modality and user tokens (DESIGN §1.2).

One adapter per modality maps event vectors to the LLM's hidden size; one shared modality adapter maps
each modality's masked mean; one user adapter maps the mean over the modalities a user actually has.
The tabular aggregate vector is projected by an MLP into a fixed number of token slots. Every soft token
is brought to the scale of the backbone's word embeddings, so the LLM sees inputs of the size it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qanchor_lab.behaviour import UserBatch


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
    ):
        super().__init__()
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
            self.tabular_mlp = Adapter(tabular_dim, adapter_hidden, hidden_size)
            self.tabular_slot = nn.Parameter(0.5 * torch.randn(tabular_slots, hidden_size))
        self.register_buffer("embed_scale", torch.tensor(float(embed_scale)))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        # Unit-RMS tokens times the RMS of the word embeddings (adapter outputs are ~100x larger otherwise).
        return F.layer_norm(x, x.shape[-1:]) * self.embed_scale

    def forward(self, batch: UserBatch) -> EncodedUser:
        events, masks = {}, {}
        means = []
        for m in self.modalities:
            x, mask = batch.events[m], batch.masks[m]                 # (B, N, D), (B, N)
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
            t = self._scale(self.tabular_mlp(batch.tabular)).unsqueeze(1)  # (B, 1, H)
            tabular = t + self.tabular_slot * self.embed_scale           # (B, S, H)
        return EncodedUser(user, modality, modality_mask, events, masks, tabular)
