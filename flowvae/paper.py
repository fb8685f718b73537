"""Published numbers that reports put beside measured ones (Rezende & Mohamed 2015, Table 2)."""

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


def paper_nll(flow: str, k: int) -> float | None:
    if k == 0:
        return TABLE2_NLL[("planar", 0)]
    return TABLE2_NLL.get((flow, k))


#: The paper's flows first, in its order; report tables and plots list families this way.
FLOW_ORDER = ["planar", "radial", "nice"]


def flow_rank(flow: str) -> tuple[int, str]:
    """Sort key: the paper's families in its order, then the rest alphabetically."""
    return (FLOW_ORDER.index(flow) if flow in FLOW_ORDER else len(FLOW_ORDER), flow)
