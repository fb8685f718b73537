"""Published numbers that reports put beside measured ones (Rezende & Mohamed 2015, Tables 2-3)."""

from __future__ import annotations

from dataclasses import dataclass

#: Test -ln p(x) upper bounds on binarised MNIST, keyed by (flow family, K). K = 0 is the
#: diagonal-Gaussian DLGM.
TABLE2_NLL: dict[tuple[str, int], float] = {
    ("planar", 0): 89.9,
    ("planar", 10): 87.5,
    ("planar", 20): 86.5,
    ("planar", 40): 85.7,
    ("planar", 80): 85.1,
    ("nice", 10): 88.6,
    ("nice", 20): 87.9,
    ("nice", 40): 87.3,
    ("nice", 80): 87.2,
}

#: Test -ln p(x) in nats on CIFAR-10 3×8×8 patches (D = 192, logit-normal likelihood, 30
#: latents), planar flows. Only the two values the paper's text confirms ("from -293.7 (K=0)
#: to -320.7 (K=10)"); K = 2 and 5 (-308.6, -317.9) are not confirmed and left out.
TABLE3_NLL: dict[tuple[str, int], float] = {
    ("planar", 0): -293.7,
    ("planar", 10): -320.7,
}


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's result tables; ``bound``: its entries are upper bounds (≤)."""

    name: str
    values: dict[tuple[str, int], float]
    bound: bool

    def nll(self, flow: str, k: int) -> float | None:
        """The paper's -ln p(x) for a flow family and length (K = 0: the flow-free DLGM)."""
        if k == 0:
            return self.values.get(("planar", 0))
        return self.values.get((flow, k))

    def cell(self, flow: str, k: int) -> str:
        value = self.nll(flow, k)
        if value is None:
            return "—"
        return f"≤ {value:.1f}" if self.bound else f"{value:.1f}"


TABLE2 = PaperTable("Table 2", TABLE2_NLL, bound=True)
TABLE3 = PaperTable("Table 3", TABLE3_NLL, bound=False)


def paper_nll(flow: str, k: int, table: PaperTable = TABLE2) -> float | None:
    return table.nll(flow, k)


#: The paper's flows first, in its order; report tables and plots list families this way.
FLOW_ORDER = ["planar", "radial", "nice"]


def flow_rank(flow: str) -> tuple[int, str]:
    """Sort key: the paper's families in its order, then the rest alphabetically."""
    return (FLOW_ORDER.index(flow) if flow in FLOW_ORDER else len(FLOW_ORDER), flow)
