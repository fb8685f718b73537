"""K planar layers as one autograd node with a hand-written backward, in two formulations.

The maths of one layer (û from the invertibility constraint, the scaled offset, the
cancellation-free log-det log(t² + s(1 - t²))) is that of planar.py, whose reference ops, run
layer by layer, this is tested against. Shapes: z (B, D); the packed parameters [u, w, b]
(P, K, 2D + 1), where P is B (amortised) or 1 (global, shared by every row).

Notation: wu = wᵀu, s = softplus(wu) + SLACK, c = (s - 1 - wu)/‖w‖², û = u + c·w,
off = ‖w‖·b̃ (or b), t = tanh(a), h = 1 - t², dn = t² + s·h (the log-det is log dn).

Per-layer recursion (amortised, P = B). Layer by layer,

    a_k = wₖᵀz_k + off_k,   t_k = tanh(a_k),   z_{k+1} = z_k + t_k û_k,

with every z_k kept for the backward pass, which runs the transposed recursion

    ∂L/∂a_k = h_k (ûₖᵀg_{k+1} + ∂L/∂t_k|log-det),   g_k = g_{k+1} + (∂L/∂a_k) w_k,

g_k = ∂L/∂z_k, and then gets every parameter gradient from full-width elementwise passes
(∂L/∂û_k = t_k g_{k+1}, the direct part of ∂L/∂w_k = (∂L/∂a_k) z_k, ∂L/∂off_k = ∂L/∂a_k).
That is B·D arithmetic per layer and three ops each way: the dot product is a batched
(1 × D+1)(D+1 × 1) product on z augmented with a constant 1 against [w_k, off_k], so the
offset costs no op of its own. Each layer's parameters are copied once into layer-major
buffers so that every per-layer op reads contiguous rows.

Block coupling (global, P = 1). A planar layer only moves z along û_k, so every later
pre-activation is known in closed form:

    a_k = wₖᵀz_0 + off_k + Σ_{j<k} t_j · (û_jᵀw_k),    z_K = z_0 + Σ_k t_k û_k.

Within a block of m layers the coupling matrix M[j, k] = û_jᵀw_k (j < k) and the starting
values wₖᵀz_0 + off_k come from batched products; the sequential part is then a scalar
recursion per row (tanh of one column, one rank-one update of the row of pending
pre-activations): two ops per layer each way instead of three, at the price of B·m·D
multiply-adds per layer in the products. The backward pass runs the same recursion in reverse
for ∂L/∂a_k and gets the parameter gradients from batched products afterwards.

Each formulation wins in its own regime (CPU, one thread, forward + backward, interleaved A/B
in one process on a loaded 2-core machine, medians): amortised B = 100, D = 40, K = 80:
per-layer 2.6-2.8 ms against coupling 5.3-5.5 ms; K = 10: 0.51 against 0.76 ms. Global
B = 512, D = 2, K = 32: an early per-layer version (broadcast dot products; the batched
product used above needs one parameter row per z row) was 18 % slower than coupling, whose
products are tiny at D = 2 and plain matrix products with shared parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Most layers per block: within a block the coupling matrix (cost B·m²·D) replaces forming z;
#: between blocks z is formed once. K layers are cut into ceil(K / BLOCK) blocks of equal size.
#: Chosen by timing forward + backward on CPU at batch 100, D = 40, K = 80 (when amortised stacks
#: still took this path): blocks of 8, 12, 16, 20, 24, 32 took 8.5, 7.7, 7.1, 6.2, 6.6, 6.4 ms.
BLOCK = 20


def block_size(k: int, most: int = BLOCK) -> int:
    """Equal blocks of at most ``most`` layers (80 -> 4 x 20, 30 -> 2 x 15, 10 -> 1 x 10)."""
    blocks = -(-k // most)
    return -(-k // max(1, blocks))


#: Largest B·K·BLOCK (coupling matrices kept for the backward pass) for which the stacked path
#: is used; beyond it (deep stacks on very large batches) the layers run one by one.
MAX_COUPLING_ELEMENTS = 1 << 24


def clamped_norm_sq(w: Tensor) -> tuple[Tensor, Tensor]:
    """‖w‖² clamped up to the smallest normal number, and where the clamp passes gradient."""
    raw = (w * w).sum(-1)
    tiny = torch.finfo(w.dtype).tiny
    # Below the clamp the reference ops (clamp_min) pass no gradient; the backward must match,
    # else 1/‖w‖² turns the gradient of w into inf/NaN.
    return raw.clamp_min(tiny), raw >= tiny


def refuse_double_backward() -> None:
    """Called first in a hand-written backward: with create_graph=True it would run under grad
    mode and return a gradient with no second-order part, so say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the stacked planar path has no double backward (create_graph=True); "
            "flowvae.flows.planar.STACKED = False runs the layers through ops that have one"
        )


def _outer(rows: Tensor, cols: Tensor, shared: bool) -> Tensor:
    """rows (B, K) ⊗ cols (B, N) -> (B, K, N), or summed over B to (1, K, N) when shared."""
    if shared:
        return (rows.transpose(0, 1) @ cols).unsqueeze(0)
    return rows.unsqueeze(2) * cols.unsqueeze(1)


def _reduce(t: Tensor, shared: bool) -> Tensor:
    return t.sum(0, keepdim=True) if shared else t


def _row_times(bias: Tensor, x: Tensor, mat: Tensor) -> Tensor:
    """bias + x_i · mat_i per row: x (B, N), mat (B|1, N, M), bias broadcastable to (B, M)."""
    if mat.shape[0] == 1:
        return torch.addmm(bias, x, mat[0])
    return torch.baddbmm(bias.unsqueeze(1), x.unsqueeze(1), mat).squeeze(1)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _constraint(params: Tensor, d: int, shift: float, slack: float):
    """u, w, b̃ views of the packed parameters and wu, s, ‖w‖² (clamped), live, c: (P, K)."""
    u, w, b = params[..., :d], params[..., d : 2 * d], params[..., 2 * d]
    wu = torch.linalg.vecdot(w, u)
    s = F.softplus(wu + shift if shift else wu) + slack
    wsq, live = clamped_norm_sq(w)
    c = (s - 1.0 - wu) / wsq
    return u, w, b, wu, s, wsq, live, c


def _unpack(ctx) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The saved (b̃, wu, ‖w‖², live, c) that _scalar_grads needs, and the rest."""
    saved = ctx.saved_tensors
    return saved[:5], saved[5:]


def _log_det(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """h = 1 - t² and dn = t² + s·h (the log-det is log dn), from t (B, K)."""
    t_sq = t * t
    h = 1.0 - t_sq
    return h, torch.addcmul(t_sq, s, h)


def _scalar_grads(ctx, scalars: tuple[Tensor, ...], g_c: Tensor, g_dn_h: Tensor, g_off: Tensor):
    """∂L/∂wu, ∂L/∂‖w‖² and ∂L/∂b̃ (P, K) from ∂L/∂c, the log-det's Σ_B ∂L/∂dn·h and ∂L/∂off."""
    b, wu, wsq, live, c = scalars
    g_c_wsq = g_c / wsq
    g_s = g_dn_h + g_c_wsq
    g_wu = g_s * torch.sigmoid(wu + ctx.shift if ctx.shift else wu) - g_c_wsq
    g_wsq = -g_c_wsq * c
    if ctx.scaled:
        n = wsq.sqrt()
        g_b = g_off * n
        g_wsq = g_wsq + g_off * b / (2.0 * n)
    else:
        g_b = g_off
    return g_wu, torch.where(live, g_wsq, 0.0), g_b


def _layers_forward(ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float):
    d = z.shape[-1]
    n_rows, n_layers = params.shape[:2]
    u, w, b, wu, s, wsq, live, c = _constraint(params, d, shift, slack)
    # Layer-major copies (K, B, D + 1): w~ = [w, off], û~ = [û, 0], and z~ = [z, 1], so that
    # a_k = w~ₖᵀz~_k is one batched product and z~ keeps its 1 through the updates.
    w_aug = params[..., d:].transpose(0, 1).contiguous()
    if scaled:
        w_aug[..., d] *= wsq.sqrt().T
    u_aug = torch.empty_like(w_aug)
    torch.addcmul(u.transpose(0, 1), c.T.unsqueeze(-1), w_aug[..., :d], out=u_aug[..., :d])
    u_aug[..., d] = 0.0
    zs = z.new_empty(n_layers + 1, n_rows, 1, d + 1)  # every z~_k, kept for the backward
    zs[0, :, 0, :d] = z
    zs[0, :, 0, d] = 1.0
    t = z.new_empty(n_layers, n_rows, 1, 1)
    # Views made once: a view per layer and op costs as much as a small op.
    z_k, t_k, u_k = zs.unbind(0), t.unbind(0), u_aug.unsqueeze(2).unbind(0)
    w_k = w_aug.unsqueeze(3).unbind(0)
    for k in range(n_layers):
        torch.bmm(z_k[k], w_k[k], out=t_k[k]).tanh_()
        torch.addcmul(z_k[k], t_k[k], u_k[k], out=z_k[k + 1])
    t = t.view(n_layers, n_rows).T
    h, dn = _log_det(t, s)
    ctx.save_for_backward(b, wu, wsq, live, c, u, s, w_aug, u_aug, t, h, dn, zs)
    return zs[n_layers, :, 0, :d], torch.log(dn).sum(-1)


def _layers_backward(ctx, g_y: Tensor, g_ld: Tensor):
    scalars, (u, s, w_aug, u_aug, t, h, dn, zs) = _unpack(ctx)
    n_layers, n_rows, d = w_aug.shape[0], w_aug.shape[1], g_y.shape[-1]
    g_dn_h = g_ld.unsqueeze(-1) / dn * h  # (B, K)
    # ∂L/∂a_k = h_k ûₖᵀg_{k+1} + bias_k, bias_k = h_k ∂L/∂t_k through log-det term k.
    bias = (g_dn_h * 2.0 * t * (1.0 - s)).T.contiguous().view(n_layers, n_rows, 1, 1)
    h_t = h.T.contiguous().view(n_layers, n_rows, 1, 1)
    gs = g_y.new_empty(n_layers + 1, n_rows, 1, d)  # g_k = ∂L/∂z_k
    gs[n_layers, :, 0] = g_y
    g_a = g_y.new_empty(n_layers, n_rows, 1, 1)
    g_k, ga_k, b_k, h_k = gs.unbind(0), g_a.unbind(0), bias.unbind(0), h_t.unbind(0)
    u_k = u_aug[..., :d].unsqueeze(3).unbind(0)
    w_k = w_aug[..., :d].unsqueeze(2).unbind(0)
    for k in range(n_layers - 1, -1, -1):
        v = torch.bmm(g_k[k + 1], u_k[k])
        torch.addcmul(b_k[k], v, h_k[k], out=ga_k[k])
        torch.addcmul(g_k[k + 1], ga_k[k], w_k[k], out=g_k[k])
    w = w_aug[..., :d]
    g_a = g_a.view(n_layers, n_rows, 1)
    g_uhat = gs[1:, :, 0].mul_(t.T.unsqueeze(-1))  # t_k g_{k+1}, over g_{k+1} (no longer used)
    g_c = torch.linalg.vecdot(g_uhat, w).T
    g_wu, g_wsq, g_b = _scalar_grads(ctx, scalars, g_c, g_dn_h, g_a.view(n_layers, n_rows).T)
    # The packed gradient is written slice by slice: no cat, no zero-filled buffer per slice.
    out = g_y.new_empty(n_rows, n_layers, 2 * d + 1)
    layer_major = out.transpose(0, 1)
    g_wu = g_wu.T.unsqueeze(-1)
    torch.addcmul(g_uhat, g_wu, w, out=layer_major[..., :d])
    g_w = torch.mul(g_a, zs[:n_layers, :, 0, :d])
    g_w.addcmul_(scalars[-1].T.unsqueeze(-1), g_uhat).addcmul_(g_wu, u.transpose(0, 1))
    torch.addcmul(g_w, (2.0 * g_wsq).T.unsqueeze(-1), w, out=layer_major[..., d : 2 * d])
    out[..., 2 * d] = g_b
    return gs[0, :, 0], out


def _coupling_forward(
    ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, block: int
):
    d = z.shape[-1]
    u, w, b, wu, s, wsq, live, c = _constraint(params, d, shift, slack)
    u_hat = torch.addcmul(u, c.unsqueeze(-1), w)
    off = wsq.sqrt() * b if scaled else b
    ts, saved = [], []
    for k0 in range(0, u.shape[1], block):
        w_t = w[:, k0 : k0 + block].transpose(-1, -2)  # (P, D, m)
        u_hat_b = u_hat[:, k0 : k0 + block]
        # coupling[j, k] = û_jᵀw_k: what t_j adds to a_k. Only j < k is ever used: the
        # entries on and below the diagonal land on pre-activations already consumed.
        coupling = u_hat_b @ w_t
        pre = _row_times(off[:, k0 : k0 + block], z, w_t)  # (B, m) pending a_k
        columns = pre.split(1, dim=1)
        rows = coupling.unbind(1)
        t_b = []
        for k in range(len(columns)):
            t = torch.tanh(columns[k])
            t_b.append(t)
            pre.addcmul_(t, rows[k])
        t_b = torch.cat(t_b, dim=1)  # (B, m)
        saved.append((z, coupling))
        ts.append(t_b)
        z = _row_times(z, t_b, u_hat_b)
    t = _cat(ts, 1)  # (B, K)
    h, dn = _log_det(t, s)
    ctx.block, ctx.blocks = block, saved
    ctx.save_for_backward(b, wu, wsq, live, c, u, w, u_hat, s, t, h, dn)
    return z, torch.log(dn).sum(-1)


def _coupling_backward(ctx, g_y: Tensor, g_ld: Tensor):
    scalars, (u, w, u_hat, s, t, h, dn) = _unpack(ctx)
    block, blocks = ctx.block, ctx.blocks
    shared = u.shape[0] == 1 and g_y.shape[0] != 1
    g_ld_dn = g_ld.unsqueeze(-1) / dn  # (B, K)
    ld_t = g_ld_dn * 2.0 * t * (1.0 - s)  # ∂L/∂t_k through log-det term k
    g = g_y  # ∂L/∂z at the output of the current block
    g_as, g_uhats, g_ws = [], [], []
    for i in range(len(blocks) - 1, -1, -1):
        z_in, coupling = blocks[i]
        k0 = i * block
        w_b, u_hat_b, t_b = (x[:, k0 : k0 + block] for x in (w, u_hat, t))
        # ∂L/∂t_k through the block's output and log-det term k, then through every later
        # pre-activation in the block, last layer first: once every layer after k has added
        # to column k, ∂L/∂a_k = h_k ∂L/∂t_k. (Adding to columns k and later afterwards is
        # harmless: they are never read again.)
        g_t = _row_times(ld_t[:, k0 : k0 + block], g, u_hat_b.transpose(-1, -2))
        columns = g_t.split(1, dim=1)
        h_columns = h[:, k0 : k0 + block].split(1, dim=1)
        into = coupling.unbind(2)
        g_a = []
        for k in range(len(columns) - 1, -1, -1):
            g_ak = columns[k] * h_columns[k]
            g_a.append(g_ak)
            g_t.addcmul_(g_ak, into[k])
        g_a = torch.cat(g_a[::-1], dim=1)  # (B, m)
        g_coupling = torch.triu(_outer(t_b, g_a, shared), diagonal=1)
        g_uhats.append(torch.baddbmm(_outer(t_b, g, shared), g_coupling, w_b))
        g_ws.append(torch.baddbmm(_outer(g_a, z_in, shared), g_coupling.transpose(-1, -2), u_hat_b))
        g_as.append(g_a)
        g = _row_times(g, g_a, w_b)
    g_uhat = _cat(g_uhats[::-1], 1)  # (P, K, D)
    g_w = _cat(g_ws[::-1], 1)
    g_off = _reduce(_cat(g_as[::-1], 1), shared)  # (P, K)
    g_c = (g_uhat * w).sum(-1)
    g_wu, g_wsq, g_b = _scalar_grads(ctx, scalars, g_c, _reduce(g_ld_dn * h, shared), g_off)
    c = scalars[-1]
    g_u = torch.addcmul(g_uhat, g_wu.unsqueeze(-1), w)
    g_w = torch.addcmul(g_w, c.unsqueeze(-1), g_uhat)
    g_w = torch.addcmul(g_w, g_wu.unsqueeze(-1), u)
    g_w = torch.addcmul(g_w, (2.0 * g_wsq).unsqueeze(-1), w)
    # One gradient for the packed parameters: no zero-filled buffer per slice.
    return g, torch.cat([g_u, g_w, g_b.unsqueeze(-1)], dim=-1)


class PlanarStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, block: int
    ):
        ctx.scaled, ctx.shift = scaled, shift
        # Shared parameters (global flows) take the block coupling, per-row ones the per-layer
        # recursion: see the module docstring for the timings behind the choice.
        ctx.coupled = params.shape[0] == 1 and z.shape[0] != 1
        if ctx.coupled:
            return _coupling_forward(ctx, z, params, scaled, slack, shift, block)
        return _layers_forward(ctx, z, params, scaled, slack, shift)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        backward = _coupling_backward if ctx.coupled else _layers_backward
        return *backward(ctx, g_y, g_ld), None, None, None, None


def planar_stack_forward(
    z: Tensor,
    params: Tensor,
    scaled_offset: bool,
    slack: float,
    shift: float = 0.0,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """z_K and Σ_k log|det J_k| of K planar layers.

    ``params`` (B|1, K, 2D + 1) holds each layer's [u, w, b] as in the flat amortised layout.
    """
    if block is None:
        block = block_size(params.shape[1])
    return PlanarStackFunction.apply(z, params, scaled_offset, slack, shift, block)
