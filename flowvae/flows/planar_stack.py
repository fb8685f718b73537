"""K planar layers as one autograd node: a few small ops per layer, the rest batched.

The maths of one layer (û from the invertibility constraint, the scaled offset, the
cancellation-free log-det log(t² + s(1 - t²))) is that of planar.py, whose reference ops, run
layer by layer, this is tested against. Every per-layer quantity that does not depend on z
(û, the offset, s and their gradients) is computed for all K layers at once, and the backward
pass is hand-written; the layer loop keeps only what depends on the previous layer.

Parameters per row (amortised, P = B: PlanarStackFunction). Layer k is three ops forward and
two backward. The pre-activations start as the offsets and a_k += z_kᵀw_k adds the row-wise dot
products as one batched (B, 1, D) x (B, D, 1) product in place (baddbmm_: its (B, 1, 1) result
broadcasts in the update, and it is cheaper here than linalg.vecdot), t_k = tanh(a_k),
z_{k+1} = z_k + t_k û_k. Backwards ∂L/∂a_k starts as its log-det part, h_k ∂L/∂t_k =
2 (1 - s_k) t_k ∂L/∂s_k, known beforehand, and takes += (h_k û_k)ᵀ∂L/∂z_{k+1} the same way;
∂L/∂z_k = ∂L/∂z_{k+1} + ∂L/∂a_k w_k. û_k and w_k are read in place, rows of stride K·(·) in
the (B, K, ·) tensors (a copy into a layer-major layout costs more than it saves). Every z_k and
∂L/∂z_{k+1} is kept in a (K, B, ·) buffer, from which ∂L/∂û_k = t_k ∂L/∂z_{k+1} and the direct
∂L/∂w_k = ∂L/∂a_k z_k of all layers come in two elementwise ops. (Coupling matrices as in the
global path below would be (K, D) x (D, K) products per row, which cost more at these sizes
than the dot products they would save.)

One set of parameters for every row (global, P = 1: PlanarSharedStackFunction). Here a layer
only moves z along û_k, so every later pre-activation is known in closed form:

    a_k = wₖᵀz_0 + off_k + Σ_{j<k} t_j · (û_jᵀw_k),    t_j = tanh(a_j),
    z_K = z_0 + Σ_k t_k û_k.

Per block of at most BLOCK layers the coupling matrix M[j, k] = û_jᵀw_k (j < k, an (m, m)
product) and the starting values wₖᵀz_0 + off_k (an (m, B) product) are computed once; the
sequential part is then tanh of one row of the (m, B) pending pre-activations and one rank-one
update of them, both in place, and z itself is formed only between blocks. The backward pass runs the
same recursion in reverse for ∂L/∂a_k and gets every parameter gradient from a few 2-D products.

Shapes: z (B, D); the packed parameters [u, w, b] (P, K, 2D + 1).

Notation: wu = wᵀu, x = wu (+ shift), s = softplus(x) + SLACK, c = (s - 1 - wu)/‖w‖²,
û = u + c·w, off = ‖w‖·b̃ (or b), t = tanh(a), h = 1 - t², dn = t² + s·h (the log-det is log dn).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

#: Most layers per block of a global stack: within a block the coupling matrix replaces forming
#: z; between blocks z is formed once. K layers are cut into ceil(K / BLOCK) blocks of equal
#: size. At B = 512, D = 2, K = 32 one block of 32 took 0.96 of the time of two blocks of 16
#: (forward + backward, one thread).
BLOCK = 32


def block_size(k: int, most: int = BLOCK) -> int:
    """Equal blocks of at most ``most`` layers (80 -> 3 x 27, 41 -> 2 x 21, 10 -> 1 x 10)."""
    blocks = -(-k // most)
    return -(-k // max(1, blocks))


#: Largest B·K·min(K, BLOCK) for which the stacked path is used; beyond it (deep stacks on very
#: large batches) the layers run one by one. (For its backward pass the stacked path keeps about
#: B·K·(2D + 10) numbers amortised, and B·K·3 plus the coupling matrices global.)
MAX_COUPLING_ELEMENTS = 1 << 24


def clamped_norm_sq(w: Tensor) -> tuple[Tensor, Tensor]:
    """‖w‖² clamped up to the smallest normal number, and where the clamp passes no gradient."""
    raw = torch.linalg.vecdot(w, w)
    wsq = raw.clamp_min(torch.finfo(w.dtype).tiny)
    # Below the clamp the reference ops (clamp_min) pass no gradient; the backward must match,
    # else 1/‖w‖² turns the gradient of w into inf/NaN. (raw < wsq is raw < tiny.)
    return wsq, raw < wsq


def _const(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of like's dtype and device, made once: with a Python float,
    each small op converts it to a tensor first, about half the op's cost here (3 of 6 µs)."""
    return _const_tensor(value, like.dtype, like.device)


@functools.cache
def _const_tensor(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def refuse_double_backward(family: str = "planar") -> None:
    """Called first in a hand-written backward: with create_graph=True it would run under grad
    mode and return a gradient with no second-order part, so say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the stacked {family} path has no double backward (create_graph=True); "
            f"flowvae.flows.{family}.STACKED = False runs the layers through ops that have one"
        )


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class PlanarStackFunction(torch.autograd.Function):
    """Parameters per row (amortised, P = B): the layers one after another, three ops forward
    and two backward per layer (see the module docstring); the parameter gradients of all
    layers come from the (K, B, ·) buffers of z_k and ∂L/∂z_k in a few batched ops."""

    @staticmethod
    def forward(ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float):
        rows, k, d = z.shape[0], params.shape[1], z.shape[-1]
        # The pre-activations, (K, B) so that a layer's are contiguous, start as the offsets.
        a4 = z.new_empty(k, rows, 1, 1)
        a = a4.view(k, rows)
        saved, s, m, u_hat, _ = _setup(params, d, scaled, slack, shift, off_out=a.t())
        zs = z.new_empty(k, rows, 1, d)  # zs[k]: z before layer k
        z_rows, a_rows = zs.unbind(0), a4.unbind(0)
        # Layer k's û and w are read in place, rows of stride K·(·): cheaper than a copy.
        u_rows = u_hat.unsqueeze(2).unbind(1)
        w_cols = saved[1].unsqueeze(3).unbind(1)
        z_rows[0].copy_(z.unsqueeze(1))
        for i in range(k - 1):
            a_rows[i].baddbmm_(z_rows[i], w_cols[i]).tanh_()
            torch.addcmul(z_rows[i], u_rows[i], a_rows[i], out=z_rows[i + 1])
        a_rows[-1].baddbmm_(z_rows[-1], w_cols[-1]).tanh_()
        y = torch.addcmul(z_rows[-1], u_rows[-1], a_rows[-1]).view(rows, d)
        # t is kept apart: the backward pass reuses a (through a_rows) for ∂L/∂a.
        t = a.clone()
        t_sq = t * t
        h = _const(1.0, t) - t_sq
        dn = torch.addcmul(t_sq, s.t(), h)  # (K, B)
        ctx.a, ctx.a_rows, ctx.w_cols = a, a_rows, w_cols
        ctx.save_for_backward(*saved, t, h, dn, m, zs, u_hat)
        return y, torch.log(dn).sum(0)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        *saved, t, h, dn, m, zs, u_hat = ctx.saved_tensors
        g_a, a_rows, w_cols = ctx.a, ctx.a_rows, ctx.w_cols
        k, rows, d = zs.shape[0], zs.shape[1], zs.shape[3]
        g_ld_h = (g_ld / dn).mul_(h)  # ∂L/∂s_k, (K, B)
        # ∂L/∂a_k = h_k ûₖᵀ∂L/∂z_{k+1} + h_k ∂L/∂t_k through log-det term k; the second term is
        # 2 (1 - s_k) t_k ∂L/∂s_k, known beforehand.
        torch.mul(g_ld_h * t, m.t(), out=g_a).mul_(_const(-2.0, t))
        hu_rows = torch.mul(h.unsqueeze(-1), u_hat.transpose(0, 1)).unsqueeze(2).unbind(0)
        gs = zs.new_empty(k, rows, d, 1)  # gs[k]: ∂L/∂z after layer k
        g_cols = gs.unbind(0)
        g_cols[-1].copy_(g_y.unsqueeze(-1))
        for i in range(k - 1, 0, -1):
            a_rows[i].baddbmm_(hu_rows[i], g_cols[i])
            torch.addcmul(g_cols[i], w_cols[i], a_rows[i], out=g_cols[i - 1])
        a_rows[0].baddbmm_(hu_rows[0], g_cols[0])
        g_z = torch.addcmul(g_cols[0], w_cols[0], a_rows[0]).view(rows, d)
        # ∂L/∂û and the direct ∂L/∂w written straight into the packed gradient's slots.
        packed = zs.new_empty(rows, k, 2 * d + 1)
        g_uhat, g_w = packed[..., :d], packed[..., d : 2 * d]
        torch.mul(t.unsqueeze(-1), gs.view(k, rows, d), out=g_uhat.transpose(0, 1))
        torch.mul(g_a.unsqueeze(-1), zs.view(k, rows, d), out=g_w.transpose(0, 1))
        _param_grads(g_uhat, g_w, g_a.t(), g_ld_h.t(), saved, packed)
        return g_z, packed, None, None, None


def _setup(
    params: Tensor,
    d: int,
    scaled: bool,
    slack: float,
    shift: float,
    off_out: Tensor | None = None,
):
    """Per-layer quantities of the packed [u, w, b] (..., K, 2D + 1): see the notation above.

    Returns what _param_grads needs, (u, w, b, x, ‖w‖², where ‖w‖² is clamped, c, ‖w‖ or
    None), then s, s - 1, û and off (written into off_out when given)."""
    u, w, b = params[..., :d], params[..., d : 2 * d], params[..., 2 * d]
    wu = torch.linalg.vecdot(w, u)
    x = wu + _const(shift, wu) if shift else wu
    s = F.softplus(x) + _const(slack, x)
    wsq, dead = clamped_norm_sq(w)
    m = s - _const(1.0, x)  # wᵀû
    c = torch.sub(m, wu).div_(wsq)
    u_hat = torch.addcmul(u, c.unsqueeze(-1), w)
    if scaled:
        n = wsq.sqrt()
        off = torch.mul(n, b, out=off_out)
    else:
        n = None
        off = b if off_out is None else off_out.copy_(b)
    return (u, w, b, x, wsq, dead, c, n), s, m, u_hat, off


def _param_grads(g_uhat, g_w, g_off, g_s, saved, packed=None):
    """∂L/∂[u, w, b] from ∂L/∂û, the direct ∂L/∂w, ∂L/∂off and ∂L/∂s (shapes (..., K, ·)), as
    one (..., K, 2D + 1) tensor: ``packed`` when g_uhat and g_w are its first 2D columns."""
    u, w, b, x, wsq, dead, c, n = saved
    g_c_wsq = torch.linalg.vecdot(g_uhat, w).div_(wsq)  # ∂L/∂c / ‖w‖²
    g_wu = torch.mul(g_s + g_c_wsq, torch.sigmoid(x)).sub_(g_c_wsq)
    neg_g_wsq = g_c_wsq * c  # -∂L/∂‖w‖²
    if n is not None:
        # written as (∂L/∂off · b)/(2‖w‖), the rounding the reference ops give
        neg_g_wsq.sub_(g_off * b / (2.0 * n))
    neg_g_wsq.masked_fill_(dead, 0.0)
    # In place: g_uhat and g_w are this backward's own buffers, and each (B, K, D) tensor
    # less is one allocation (and its page faults) less in a deep stack.
    g_wu = g_wu.unsqueeze(-1)
    g_w.addcmul_(c.unsqueeze(-1), g_uhat).addcmul_(g_wu, u)
    g_w.addcmul_(neg_g_wsq.unsqueeze(-1), w, value=-2.0)
    g_u = g_uhat.addcmul_(g_wu, w)
    if packed is None:
        g_b = g_off if n is None else g_off * n
        return torch.cat([g_u, g_w, g_b.unsqueeze(-1)], dim=-1)
    if n is None:
        packed[..., -1].copy_(g_off)
    else:
        torch.mul(g_off, n, out=packed[..., -1])
    return packed


class PlanarSharedStackFunction(torch.autograd.Function):
    """The same maps with one set of parameters for every row (a global stack): the layer
    quantities are (K, ·), and the pending pre-activations are kept transposed, (m, B), so that
    each layer's tanh and rank-one update run in place on contiguous rows (tanh_, addmm_)."""

    @staticmethod
    def forward(
        ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, block: int
    ):
        layer, s, _, u_hat, off = _setup(params[0], z.shape[-1], scaled, slack, shift)
        w = layer[1]
        ts, saved = [], []
        for k0 in range(0, w.shape[0], block):
            w_b, u_hat_b = w[k0 : k0 + block], u_hat[k0 : k0 + block]
            # coupling[j, k] = û_jᵀw_k for j < k, else 0: row j is what t_j adds to every a_k.
            coupling = torch.triu(u_hat_b @ w_b.t(), diagonal=1)  # (m, m)
            # The pending pre-activations (m, B) turn into t in place: row k becomes t_k once it
            # is final, and the later rank-one updates add exactly 0 to it (coupling[k, j] = 0
            # for j <= k), so reading it while updating is safe.
            t_b = torch.addmm(off[k0 : k0 + block].unsqueeze(1), w_b, z.t())
            rows, into = t_b.unsqueeze(1).unbind(0), coupling.unsqueeze(2).unbind(0)
            for k in range(len(rows) - 1):
                t_b.addmm_(into[k], rows[k].tanh_())
            rows[-1].tanh_()
            saved.append((z, coupling))
            ts.append(t_b)
            z = torch.addmm(z, t_b.t(), u_hat_b)
        t = _cat(ts, 0)  # (K, B)
        t_sq = t * t
        h = 1.0 - t_sq
        dn = torch.addcmul(t_sq, s.unsqueeze(1), h)
        ctx.block, ctx.blocks = block, saved
        ctx.save_for_backward(*layer, s, u_hat, t, h, dn)
        return z, torch.log(dn).sum(0)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        *layer, s, u_hat, t, h, dn = ctx.saved_tensors
        w, block, blocks = layer[1], ctx.block, ctx.blocks
        g_ld_dn = g_ld / dn  # (K, B)
        # Half of ∂L/∂t_k through log-det term k, 2 t_k (1 - s_k)/dn_k (doubled by addmm's beta).
        ld_t = (g_ld_dn * t).mul_((1.0 - s).unsqueeze(1))
        g = g_y.contiguous()
        g_as, g_uhats, g_ws = [], [], []
        for i in range(len(blocks) - 1, -1, -1):
            z_in, coupling = blocks[i]
            k0 = i * block
            w_b, u_hat_b, t_b = w[k0 : k0 + block], u_hat[k0 : k0 + block], t[k0 : k0 + block]
            # ∂L/∂t_k (m, B), turned into ∂L/∂a_k in place, last layer first: once every later
            # layer has added to row k, ∂L/∂a_k = h_k ∂L/∂t_k, and row k receives only 0 after.
            g_a = torch.addmm(ld_t[k0 : k0 + block], u_hat_b, g.t(), beta=2.0)
            rows, h_rows = g_a.unsqueeze(1).unbind(0), h[k0 : k0 + block].unbind(0)
            into = coupling.t().unsqueeze(2).unbind(0)
            for k in range(len(rows) - 1, 0, -1):
                g_a.addmm_(into[k], rows[k].mul_(h_rows[k]))
            rows[0].mul_(h_rows[0])
            g_coupling = (t_b @ g_a.t()).triu_(1)
            g_uhats.append(torch.addmm(t_b @ g, g_coupling, w_b))
            g_ws.append(torch.addmm(g_a @ z_in, g_coupling.t(), u_hat_b))
            g_as.append(g_a)
            g = torch.addmm(g, g_a.t(), w_b)
        g_uhat = _cat(g_uhats[::-1], 0)  # (K, D)
        g_w = _cat(g_ws[::-1], 0)
        g_off = _cat(g_as[::-1], 0).sum(1)  # (K,)
        g_s = (g_ld_dn * h).sum(1)
        packed = _param_grads(g_uhat, g_w, g_off, g_s, layer)
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
    if params.shape[0] != 1:
        return PlanarStackFunction.apply(z, params, scaled_offset, slack, shift)
    if block is None:
        block = block_size(params.shape[1])
    return PlanarSharedStackFunction.apply(z, params, scaled_offset, slack, shift, block)
