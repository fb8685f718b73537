"""Inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling,
NIPS 2016, "Improving variational inference with inverse autoregressive flow").

    [m, s] = MADE(z [, c]),   σ = sigmoid(s + forget_bias)
    f(z) = σ ⊙ z + (1 - σ) ⊙ m        log|det ∂f/∂z| = Σᵢ log σᵢ

(the paper's numerically stable "LSTM-type" update, eq. 14). mᵢ and sᵢ depend only on the
coordinates before i in the layer's ordering, so the Jacobian is triangular with diagonal σ and
the log-det is exact. The ordering is reversed on odd layer indices so a stack mixes both ways.

The MADE's weights are always module parameters; when amortised the per-example parameters are
a context vector c (the encoder's h) added, unmasked, to the first hidden pre-activation, as in
the paper and the sylvester-flows reference. The inverse runs D passes: after pass k the first k
coordinates of the ordering are exact, because m and s for coordinate k only read earlier ones.

The gate logit is floored softly, ℓ = -L + softplus(ℓ_raw + L) with L = GATE_LOGIT_FLOOR = 3,
which is ℓ_raw to within e^-(ℓ_raw+L) for ordinary values (1.018 for the initial ℓ_raw = 1) but
keeps σ ≥ sigmoid(-3): as σ → 0 the layer forgets z and its inverse becomes ill-conditioned
(σ underflowing to 0 makes it non-invertible outright).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae.flows.base import Flow, context_stress_params
from flowvae.flows.registry import FLOWS

#: σ >= sigmoid(-3) ≈ 0.047, each coordinate contracts by at most ~e^-3 per layer. The inverse
#: divides by σ at every step of a D-step chain, so its error grows like (|∂m/∂z|/σ)^D: with
#: random O(1) MADE weights a floor of e^-10 loses every digit at D = 40, e^-3 loses few.
GATE_LOGIT_FLOOR = 3.0


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 connectivity mask."""

    def __init__(self, n_in: int, n_out: int, mask: Tensor) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(dim: int, index: int, hidden: list[int]) -> tuple[Tensor, list[Tensor]]:
    """Input degrees (1..D, reversed on odd layers) and hidden degrees cycling over 1..D-1."""
    inputs = torch.arange(1, dim + 1)
    if index % 2:
        inputs = inputs.flip(0)
    hiddens = [torch.arange(h) % (dim - 1) + 1 for h in hidden]
    return inputs, hiddens


@FLOWS.register("iaf")
class IAF(Flow):
    """IAF layer: a MADE (``hidden`` widths, ELU) gives (m, s); gated update with forget bias."""

    def __init__(
        self,
        dim: int,
        *,
        amortized: bool = False,
        index: int = 0,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        context_dim: int | None = None,
        forget_bias: float = 1.0,
    ) -> None:
        if dim < 2:
            raise ValueError(f"IAF needs dim >= 2 (a 1-D autoregressive map is affine), got {dim}")
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"IAF needs at least one hidden layer of width >= 1, got {hidden}")
        self.context_dim = (dim if context_dim is None else int(context_dim)) if amortized else 0
        super().__init__(dim, amortized=amortized, index=index)
        self.forget_bias = float(forget_bias)
        deg_in, deg_hidden = made_degrees(dim, index, hidden)
        self.register_buffer("order", deg_in.argsort(), persistent=False)
        layers = []
        prev = deg_in
        for deg in deg_hidden:
            # a hidden unit of degree k may read inputs of degree <= k
            layers.append(MaskedLinear(len(prev), len(deg), (deg[:, None] >= prev[None, :])))
            prev = deg
        self.hidden_layers = nn.ModuleList(layers)
        # outputs for coordinate i may read hidden units of degree < deg_in[i] only
        out_mask = (deg_in[:, None] > prev[None, :]).repeat(2, 1)
        self.out = MaskedLinear(len(prev), 2 * dim, out_mask)
        # start near the paper's initial state: m ≈ 0, σ ≈ sigmoid(forget_bias)
        nn.init.normal_(self.out.weight, std=1e-2 / math.sqrt(len(prev)))
        nn.init.zeros_(self.out.bias)
        self.context_layer = nn.Linear(self.context_dim, hidden[0]) if self.context_dim else None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"context": (self.context_dim,)} if self.context_dim else {}

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def made(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """(m, gate logit) per coordinate, each (B, D)."""
        x = self.hidden_layers[0](z)
        if context is not None and self.context_layer is not None:
            x = x + self.context_layer(context)
        x = F.elu(x)
        for layer in self.hidden_layers[1:]:
            x = F.elu(layer(x))
        m, s = self.out(x).chunk(2, dim=-1)
        logit = s + self.forget_bias
        logit = F.softplus(logit + GATE_LOGIT_FLOOR) - GATE_LOGIT_FLOOR
        return m, logit

    def transform(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m, logit = self.made(z, context)
        gate = torch.sigmoid(logit)
        z_next = gate * z + (1.0 - gate) * m
        return z_next, F.logsigmoid(logit).sum(-1)

    def inverse_transform(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        z = torch.zeros_like(y)
        for i in self.order.tolist():
            m, logit = self.made(z, context)
            # y - m = σ (z - m); divide by σ via exp(-logsigmoid) to stay finite near the floor
            zi = m[:, i] + (y[:, i] - m[:, i]) * torch.exp(-F.logsigmoid(logit[:, i]))
            z = torch.cat([z[:, :i], zi.unsqueeze(-1), z[:, i + 1 :]], dim=-1)
        return z

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, context_dim={self.context_dim}"

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        return context_stress_params(dim, batch, dtype)
