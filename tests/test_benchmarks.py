"""`benchmarks/run.py --quick` end to end on the real MNIST files: every item is timed for both
implementations, the numbers are finite and positive, and the report renders. (A smoke test of
the harness: quick numbers are not benchmark results.)"""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import built_once

#: The benchmark harness end to end takes about twenty seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory, repo_root, mnist_dir):
    """--quick, and shorter still: half a second per item, S = 50 (one size is enough to see
    both implementations timed) and the whole-split evaluation on one thread, as the tests'
    processes run."""

    def build(folder):
        cmd = [
            sys.executable, str(repo_root / "benchmarks" / "run.py"), "--quick", "--device", "cpu",
            "--ks", "0,10", "--compile-ks", "none", "--seconds-per-item", "0.5",
            "--iw-samples", "50", "--eval-threads", "1", "--data-root", str(mnist_dir),
            "--out", str(folder / "quick.json"),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    return json.loads((built_once(tmp_path_factory, "bench", build) / "quick.json").read_text())


def test_every_item_is_timed_for_both_implementations(quick):
    assert [row["k"] for row in quick["vae"]] == [0, 10]
    for row in quick["vae"]:
        for impl in ("flowvae", "baseline"):
            t = row[impl]
            assert math.isfinite(t["median_s"]) and t["median_s"] > 0, (row["k"], impl)
            assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert "head_only" in quick["vae"][1] and "head_only" not in quick["vae"][0]
    for row in quick["vae"]:  # the floor: the step's products and optimiser step alone
        assert 0 < row["optimizer"]["median_s"] < row["floor"]["median_s"]
        assert row["gemm_flops"] > 1.5e9
    for row in quick["iw"]:
        assert row["flowvae"]["median_s"] > 0 and row["baseline"]["median_s"] > 0
    assert quick["density"]["flowvae"]["median_s"] > 0
    assert quick["iw_full"]["images"] > 0 and math.isfinite(quick["iw_full"]["nll"])
    assert not [n for n in quick["notes"] if "non-finite" in n], quick["notes"]


def test_parameter_counts_and_memory_are_sane(quick):
    # flowvae's K=10 model adds exactly the flow-parameter head, Linear(400, 10 * 81).
    k0, k10 = quick["vae"]
    assert k10["params"] - k0["params"] == 400 * 810 + 810
    (probe,) = [m for m in quick["memory"] if m["impl"] == "flowvae"]
    assert probe["result"]["growth"] >= 0


def test_the_report_renders(quick, repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    text = run.markdown(quick)
    assert "## 1. VAE training step" in text and "## 3. Density matching step" in text
    assert "| floor / step |" in text
    assert quick["machine"]["torch"] in text
