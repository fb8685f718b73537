"""K planar layers as one autograd node whose loop over layers is two small ops per layer.

A planar layer only moves z along û_k, so every later pre-activation is known in closed form:

    a_k = wₖᵀz_0 + off_k + Σ_{j<k} t_j · (û_jᵀw_k),    t_j = tanh(a_j),
    z_K = z_0 + Σ_k t_k û_k.

The coupling matrix M[j, k] = û_jᵀw_k (j < k) and the K starting values wₖᵀz_0 + off_k come
from two batched matrix products; the sequential part is then a scalar recursion per row
(tanh of one column, one rank-one update of the row of pending pre-activations), and z itself
is never formed between layers. The backward pass runs the same recursion in reverse for
∂L/∂a_k and gets every parameter gradient from a few batched products afterwards. This replaces
some 40 kernel launches per layer and step with about 4, which is what a deep amortised stack
spends its time on at batch 100.

The maths of one layer (û from the invertibility constraint, the scaled offset, the
cancellation-free log-det log(t² + s(1 - t²))) is that of planar.py, whose reference ops, run
layer by layer, this is tested against. Shapes: z (B, D); the packed parameters [u, w, b]
(P, K, 2D + 1), where P is B (amortised) or 1 (global, shared by every row).

Notation: wu = wᵀu, s = softplus(wu) + SLACK, c = (s - 1 - wu)/‖w‖², û = u + c·w,
off = ‖w‖·b̃ (or b), t = tanh(a), h = 1 - t², dn = t² + s·h (the log-det is log dn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Most layers per block: within a block the coupling matrix (cost B·m²·D) replaces forming z;
#: between blocks z is formed once. K layers are cut into ceil(K / BLOCK) blocks of equal size.
#: Chosen by timing forward + backward on CPU at batch 100, D = 40, K = 80: blocks of 8, 12, 16,
#: 20, 24, 32 took 8.5, 7.7, 7.1, 6.2, 6.6, 6.4 ms.
BLOCK = 20

#: The same for one set of parameters shared by every row (a global stack), where a layer's
#: update is a rank-one update of the (m, B) pending pre-activations.
SHARED_BLOCK = 32


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


class PlanarStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, block: int
    ):
        d = z.shape[-1]
        u, w, b = params[..., :d], params[..., d : 2 * d], params[..., 2 * d :]
        wu = (w * u).sum(-1)  # (P, K)
        s = F.softplus(wu + shift if shift else wu) + slack
        wsq, live = clamped_norm_sq(w)
        c = (s - 1.0 - wu) / wsq
        u_hat = torch.addcmul(u, c.unsqueeze(-1), w)
        off = wsq.sqrt() * b[..., 0] if scaled else b[..., 0]
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
        t_sq = t * t
        h = 1.0 - t_sq
        dn = torch.addcmul(t_sq, s, h)
        ctx.scaled, ctx.shift, ctx.block, ctx.blocks = scaled, shift, block, saved
        ctx.save_for_backward(u, w, b, wu, s, wsq, c, u_hat, t, h, dn, live)
        return z, torch.log(dn).sum(-1)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        u, w, b, wu, s, wsq, c, u_hat, t, h, dn, live = ctx.saved_tensors
        block, blocks = ctx.block, ctx.blocks
        shared = u.shape[0] == 1 and g_y.shape[0] != 1
        g_ld_dn = g_ld.unsqueeze(-1) / dn  # (B, K)
        ld_t = g_ld_dn * 2.0 * t * (1.0 - s)  # ∂L/∂t_k through log-det term k
        # A gradient broadcast from a scalar (loss = y.sum()) has zero strides, which sends the
        # batched products below to one small product per row; one copy avoids that.
        g = g_y.contiguous()  # ∂L/∂z at the output of the current block
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
            g_ws.append(
                torch.baddbmm(_outer(g_a, z_in, shared), g_coupling.transpose(-1, -2), u_hat_b)
            )
            g_as.append(g_a)
            g = _row_times(g, g_a, w_b)
        g_uhat = _cat(g_uhats[::-1], 1)  # (P, K, D)
        g_w = _cat(g_ws[::-1], 1)
        g_off = _reduce(_cat(g_as[::-1], 1), shared)  # (P, K)
        g_c = (g_uhat * w).sum(-1)
        g_c_wsq = g_c / wsq
        g_s = _reduce(g_ld_dn * h, shared) + g_c_wsq
        g_wu = g_s * torch.sigmoid(wu + ctx.shift if ctx.shift else wu) - g_c_wsq
        g_wsq = -g_c_wsq * c
        if ctx.scaled:
            n = wsq.sqrt()
            g_b = g_off * n
            g_wsq = g_wsq + g_off * b[..., 0] / (2.0 * n)
        else:
            g_b = g_off
        g_wsq = torch.where(live, g_wsq, 0.0)
        g_u = torch.addcmul(g_uhat, g_wu.unsqueeze(-1), w)
        g_w = torch.addcmul(g_w, c.unsqueeze(-1), g_uhat)
        g_w = torch.addcmul(g_w, g_wu.unsqueeze(-1), u)
        g_w = torch.addcmul(g_w, (2.0 * g_wsq).unsqueeze(-1), w)
        # One gradient for the packed parameters: no zero-filled buffer per slice.
        return g, torch.cat([g_u, g_w, g_b.unsqueeze(-1)], dim=-1), None, None, None, None


def _setup(params: Tensor, d: int, scaled: bool, slack: float, shift: float):
    """Per-layer quantities of the packed [u, w, b] (..., K, 2D + 1): see the notation above."""
    u, w, b = params[..., :d], params[..., d : 2 * d], params[..., 2 * d]
    wu = torch.linalg.vecdot(w, u)
    s = F.softplus(wu + shift if shift else wu) + slack
    wsq, live = clamped_norm_sq(w)
    c = (s - 1.0 - wu) / wsq
    u_hat = torch.addcmul(u, c.unsqueeze(-1), w)
    off = wsq.sqrt() * b if scaled else b
    return u, w, b, wu, s, wsq, live, c, u_hat, off


def _param_grads(ctx, g_uhat, g_w, g_off, g_s, saved):
    """∂L/∂[u, w, b] from ∂L/∂û, the direct ∂L/∂w, ∂L/∂off and ∂L/∂s (shapes (..., K, ·))."""
    u, w, b, wu, wsq, live, c = saved
    g_c = torch.linalg.vecdot(g_uhat, w)
    g_c_wsq = g_c / wsq
    g_s = g_s + g_c_wsq
    g_wu = g_s * torch.sigmoid(wu + ctx.shift if ctx.shift else wu) - g_c_wsq
    g_wsq = -g_c_wsq * c
    if ctx.scaled:
        n = wsq.sqrt()
        g_b = g_off * n
        g_wsq = g_wsq + g_off * b / (2.0 * n)
    else:
        g_b = g_off
    g_wsq = torch.where(live, g_wsq, 0.0)
    g_u = torch.addcmul(g_uhat, g_wu.unsqueeze(-1), w)
    g_w = torch.addcmul(g_w, c.unsqueeze(-1), g_uhat)
    g_w = torch.addcmul(g_w, g_wu.unsqueeze(-1), u)
    g_w = torch.addcmul(g_w, (2.0 * g_wsq).unsqueeze(-1), w)
    return torch.cat([g_u, g_w, g_b.unsqueeze(-1)], dim=-1)


class PlanarSharedStackFunction(torch.autograd.Function):
    """The same maps with one set of parameters for every row (a global stack): the layer
    quantities are (K, ·), and the pending pre-activations are kept transposed, (m, B), so that
    each layer's tanh and rank-one update run on contiguous rows (tanh, addr_)."""

    @staticmethod
    def forward(
        ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, block: int
    ):
        u, w, b, wu, s, wsq, live, c, u_hat, off = _setup(
            params[0], z.shape[-1], scaled, slack, shift
        )
        ts, saved = [], []
        for k0 in range(0, u.shape[0], block):
            w_b, u_hat_b = w[k0 : k0 + block], u_hat[k0 : k0 + block]
            # coupling[j, k] = û_jᵀw_k: row j is what t_j adds to every a_k (used for j < k).
            coupling = u_hat_b @ w_b.t()  # (m, m)
            pre = torch.addmm(off[k0 : k0 + block].unsqueeze(1), w_b, z.t())  # (m, B)
            t_b = torch.empty_like(pre)
            rows, t_rows, into = pre.unbind(0), t_b.unbind(0), coupling.unbind(0)
            for k in range(len(rows) - 1):
                pre.addr_(into[k], torch.tanh(rows[k], out=t_rows[k]))
            torch.tanh(rows[-1], out=t_rows[-1])
            saved.append((z, coupling))
            ts.append(t_b)
            z = torch.addmm(z, t_b.t(), u_hat_b)
        t = _cat(ts, 0)  # (K, B)
        t_sq = t * t
        h = 1.0 - t_sq
        dn = torch.addcmul(t_sq, s.unsqueeze(1), h)
        ctx.scaled, ctx.shift, ctx.block, ctx.blocks = scaled, shift, block, saved
        ctx.save_for_backward(u, w, b, wu, s, wsq, c, u_hat, t, h, dn, live)
        return z, torch.log(dn).sum(0)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        u, w, b, wu, s, wsq, c, u_hat, t, h, dn, live = ctx.saved_tensors
        block, blocks = ctx.block, ctx.blocks
        g_ld_dn = g_ld / dn  # (K, B)
        ld_t = g_ld_dn * t * (2.0 - 2.0 * s).unsqueeze(1)  # ∂L/∂t_k through log-det term k
        g = g_y.contiguous()
        g_as, g_uhats, g_ws = [], [], []
        for i in range(len(blocks) - 1, -1, -1):
            z_in, coupling = blocks[i]
            k0 = i * block
            w_b, u_hat_b, t_b = w[k0 : k0 + block], u_hat[k0 : k0 + block], t[k0 : k0 + block]
            # ∂L/∂t_k (m, B), last layer first: once every later layer has added to row k,
            # ∂L/∂a_k = h_k ∂L/∂t_k. (Rows k and later also receive additions: never read again.)
            g_t = torch.addmm(ld_t[k0 : k0 + block], u_hat_b, g.t())
            g_a = torch.empty_like(g_t)
            rows, a_rows, h_rows = g_t.unbind(0), g_a.unbind(0), h[k0 : k0 + block].unbind(0)
            into = coupling.unbind(1)
            for k in range(len(rows) - 1, 0, -1):
                g_t.addr_(into[k], torch.mul(rows[k], h_rows[k], out=a_rows[k]))
            torch.mul(rows[0], h_rows[0], out=a_rows[0])
            g_coupling = torch.triu(t_b @ g_a.t(), diagonal=1)
            g_uhats.append(torch.addmm(t_b @ g, g_coupling, w_b))
            g_ws.append(torch.addmm(g_a @ z_in, g_coupling.t(), u_hat_b))
            g_as.append(g_a)
            g = torch.addmm(g, g_a.t(), w_b)
        g_uhat = _cat(g_uhats[::-1], 0)  # (K, D)
        g_w = _cat(g_ws[::-1], 0)
        g_off = _cat(g_as[::-1], 0).sum(1)  # (K,)
        g_s = (g_ld_dn * h).sum(1)
        packed = _param_grads(ctx, g_uhat, g_w, g_off, g_s, (u, w, b, wu, wsq, live, c))
        return g, packed.unsqueeze(0), None, None, None, None


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
    shared = params.shape[0] == 1
    if block is None:
        block = block_size(params.shape[1], SHARED_BLOCK if shared else BLOCK)
    fn = PlanarSharedStackFunction if shared else PlanarStackFunction
    return fn.apply(z, params, scaled_offset, slack, shift, block)
