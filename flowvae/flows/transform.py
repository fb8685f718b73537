"""A flow stack as a ``torch.distributions.Transform``, for code written against
torch.distributions (``TransformedDistribution``, pyro, zuko-style APIs).

>>> stack = flows.build("nice", dim=2, k=4)
>>> base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
>>> q = TransformedDistribution(base, stack.as_transform())
>>> z = q.rsample((512,)); log_q = q.log_prob(z)      # exact: the pair is cached

The log-det is the flow's own (not autograd's), the inverse the flow's own (numerical for
planar and the Sylvester families). The last forward pass is remembered, so ``log_prob`` right
after ``rsample`` reuses its x and log-det instead of inverting.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Transform, constraints


class FlowTransform(Transform):
    """``y = stack(x, params)`` on vectors (event dimension 1).

    ``params``: None for a global stack; for an amortised one, the (B, P) parameters of B
    examples (x then has B rows), or (1, P) shared by every row. Leading sample axes of x are
    flattened into rows and restored.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, stack, params: Tensor | None = None, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        stack.check(params)
        self.stack, self.params = stack, params
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # x, y, log|det| of _call

    @property
    def sign(self) -> int:
        if all(layer.orientation_preserving for layer in self.stack.layers):
            return 1
        raise NotImplementedError("a reflection in the stack may flip the orientation")

    def _rows(self, t: Tensor) -> Tensor:
        return t.reshape(-1, self.stack.dim)

    def _call(self, x: Tensor) -> Tensor:
        y, log_det = self.stack(self._rows(x), self.params)
        y, log_det = y.reshape(x.shape), log_det.reshape(x.shape[:-1])
        self._last = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        return self.stack.inverse(self._rows(y), self.params).reshape(y.shape)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det ∂y/∂x| per event, shape x.shape[:-1]: the one computed with y when
        (x, y) is the last pair this transform produced, else a forward pass from x."""
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        _, log_det = self.stack(self._rows(x), self.params)
        return log_det.reshape(x.shape[:-1])

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        if self._cache_size == cache_size:
            return self
        return FlowTransform(self.stack, self.params, cache_size)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FlowTransform)
            and other.stack is self.stack
            and other.params is self.params
        )

    __hash__ = Transform.__hash__
