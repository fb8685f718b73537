# flowvae — common tasks. `make setup` installs and runs the main job; `make test` runs the tests.
PYTHON ?= python
FLOWVAE ?= $(PYTHON) -m flowvae
RUN ?= runs/energy-U1-planar-k32

.PHONY: setup install train test test-fast lint format bench gpu-check figure3 mnist-quick mnist-results table2 keep table2-ablation table3 table2-runs bench-sweep figure1 posterior bench-peers bench-floor

# Runs at once in the grids below (`flowvae sweep --jobs`), each on cores/JOBS threads. Default:
# one per core, each run on one thread. On the 2-core development machine one run on two threads
# does about 1.6 times the updates of a one-thread run, so two one-thread runs side by side do
# about 2/1.6 = 1.25 times the work (`make bench-sweep` measures it; docs/benchmarks.md).
# JOBS=1 runs the grid one run after another in one process, as before.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)

setup: install train

install:
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"

# The main job: planar K=32 on U1 (needs no data), then its KL and the Figure-3 picture.
train:
	@if [ -f $(RUN)/checkpoints/last.pt ]; then \
		$(FLOWVAE) train --config configs/energy.yaml --out $(RUN) --resume; \
	else \
		$(FLOWVAE) train --config configs/energy.yaml --out $(RUN); \
	fi
	$(FLOWVAE) eval $(RUN)/checkpoints/best.pt
	$(FLOWVAE) sample $(RUN)/checkpoints/best.pt --out $(RUN)/figure3.png

# The tests run in TEST_JOBS pytest-xdist workers (the `dev` extra installs pytest-xdist), one per
# core: each test is single-threaded (but a few that start two processes), so on two cores the
# suite takes about half its CPU time. worksteal hands the tests out in contiguous parts, one a
# worker, and lets an idle worker take over the rest of a busy one's queue, so a module's tests,
# and its module-scoped fixture, mostly stay on one worker (the costliest fixture is built once
# for all: built_once in tests/conftest.py). TEST_JOBS=1: one plain pytest, without -n (and
# without pytest-xdist).
# The cores, not nproc's answer under OMP_NUM_THREADS=1 (which the tests' own processes use).
TEST_JOBS ?= $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
PYTEST_JOBS = $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist worksteal)

test:
	$(PYTHON) -m pytest -q $(PYTEST_JOBS)

test-fast:
	$(PYTHON) -m pytest -q $(PYTEST_JOBS) -m "not slow"

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

bench:
	$(PYTHON) benchmarks/run.py

# The VAE training step against its floor at K = 0, 10, 80 on one thread, then where its time
# goes (docs/benchmarks.md, "How far from the floor"): about four minutes; run it on a quiet
# machine. The docs' tables are these files' tables (tests/test_docs_benchmarks.py).
bench-floor:
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/run.py --device cpu --threads 1 --ks 0,10,80 \
		--compile-ks none --head-only-ks none --no-full-eval --no-memory --seconds-per-item 8 \
		--iw-samples 200 --out benchmarks/results-floor.md
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/profile_step.py --ks 0,10,80 --out benchmarks/results-profile.md

# flowvae's planar and radial stacks against pyro-ppl's and normflows' layers: the maps checked
# identical in float64, then forward + backward timed on one thread (benchmarks/peers.py, about
# two minutes; docs/benchmarks.md). The peers go into a venv of their own under runs/ that sees
# this environment's packages, with torch pinned to the installed version so pip keeps it.
PEERS_VENV ?= runs/peers-venv
bench-peers:
	[ -x $(PEERS_VENV)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(PEERS_VENV)
	$(PYTHON) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(PEERS_VENV)/constraints.txt
	$(PEERS_VENV)/bin/python -m pip install -q -c $(PEERS_VENV)/constraints.txt pyro-ppl normflows
	$(PEERS_VENV)/bin/python -c "import sys, torch; sys.exit(None if torch.__version__.split('+')[0] == open(sys.argv[1]).read().strip()[7:] else 'bench-peers: pip changed torch')" $(PEERS_VENV)/constraints.txt
	OMP_NUM_THREADS=1 $(PEERS_VENV)/bin/python benchmarks/peers.py

# On a CUDA machine, one pass of what needs the GPU: the CUDA tests, then the benchmark on the
# card (planar K = 0, 10, 80 eager and compiled), a few minutes in all.
gpu-check:
	$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device (torch.cuda.is_available() is False)')"
	$(PYTHON) -m pytest -q -k cuda
	$(PYTHON) benchmarks/run.py --device cuda --ks 0,10,80 \
		--seconds-per-item 6 --out benchmarks/results-cuda.md

mnist-quick:
	$(FLOWVAE) train --config configs/mnist_quick.yaml

# The paper's Figure 3 from scratch: 72 density fits (two seeds each), their KL table (last
# checkpoints, 100,000 samples) and one picture. About an hour on 2 cores; finished runs are kept.
FIG3_OUT ?= runs/figure3
figure3:
	$(FLOWVAE) sweep --config configs/energy.yaml --grid target.name=U1,U2,U3,U4 \
		--grid flow.name=planar,radial --grid flow.k=2,8,32 --grid seed=0,1 \
		--checkpoint last --out $(FIG3_OUT) --no-progress --jobs $(JOBS)
	$(FLOWVAE) sweep --config configs/energy-nice.yaml --grid target.name=U1,U2,U3,U4 \
		--grid flow.name=nice --grid flow.k=2,8,32 --grid seed=0,1 \
		--checkpoint last --out $(FIG3_OUT) --no-progress --jobs $(JOBS)
	$(FLOWVAE) report $(FIG3_OUT) --out docs/figure3.md --figure docs/figure3.png

# MNIST at the documented budget (docs/results.md): planar K in {0, 10, 40} and NICE K = 10.
MNIST_OUT ?= runs/mnist-results
mnist-results:
	$(FLOWVAE) sweep --config configs/mnist_quick.yaml --grid flow.k=0,10,40 --out $(MNIST_OUT)/planar --no-progress
	$(FLOWVAE) sweep --config configs/mnist_quick.yaml --set flow.name=nice --grid flow.k=10 --out $(MNIST_OUT)/nice --no-progress
	$(FLOWVAE) report $(MNIST_OUT) --out docs/results-mnist.md --plot docs/nll_vs_k.png

# The paper's Table 2 and Figure 4: nine rows (K = 0; planar and NICE, K = 10, 20, 40, 80), one
# config each in configs/table2/, 45,000 updates a row (at most an hour on 2 cores), each evaluated at S = 200 and
# S = 5,000 on the test set from its best.pt (chosen on validation data). Finished rows are
# skipped and interrupted ones resumed; TABLE2_ROWS picks rows, e.g.
#   make table2 TABLE2_ROWS=configs/table2/planar-k10.yaml
# `make table2-runs` trains and evaluates only (TABLE2_SET and TABLE2_EVAL change the budget, as
# `make bench-sweep` does), without copying into docs/.
TABLE2_OUT ?= runs/table2
TABLE2_ROWS ?= $(sort $(wildcard configs/table2/*.yaml))
TABLE2_SET ?=
TABLE2_EVAL ?= --iw-samples 200 --iw-samples 5000
table2: table2-runs
	for run in $(TABLE2_OUT)/*/; do [ ! -f $$run/eval.json ] || $(MAKE) -s keep KEEP_RUN=$${run%/} KEEP_AS=table2; done
	$(FLOWVAE) report docs/runs/table2 --out docs/table2.md --plot docs/figure4.png

table2-runs:
	$(FLOWVAE) sweep $(foreach row,$(TABLE2_ROWS),--config $(row)) --out $(TABLE2_OUT) \
		$(TABLE2_SET) $(TABLE2_EVAL) --no-progress --jobs $(JOBS)

# A reduced Table 2 (nine rows, 3,000 updates each, S = 200 on 2,000 test images) one run after
# another on two threads, then with --jobs 2: wall times and their ratio into
# benchmarks/results-sweep-jobs.md (about 25 minutes on 2 cores; needs a quiet machine).
bench-sweep:
	benchmarks/sweep_jobs.sh

# The numbers the docs quote, kept in the repository: a run's eval.json (with its per-image
# estimates), run.json and config.yaml, not its checkpoints, under docs/runs/<table>/, so that
# `flowvae report docs/runs/table2` rebuilds the table and the paired differences once runs/ is gone.
#   make keep KEEP_RUN=runs/table2/nice-k40 KEEP_AS=table2
KEEP_AS ?= table2
keep:
	mkdir -p docs/runs/$(KEEP_AS)/$(notdir $(KEEP_RUN))
	cp $(KEEP_RUN)/eval.json $(KEEP_RUN)/run.json $(KEEP_RUN)/config.yaml docs/runs/$(KEEP_AS)/$(notdir $(KEEP_RUN))/

# What each ingredient of the Table 2 recipe buys: planar K = 10 at 40,000 updates (about 13
# minutes on 2 cores) with one ingredient changed per config in configs/table2-ablation/,
# evaluated on the validation images (S = 200) so that no choice looks at the test set.
ABLATION_OUT ?= runs/table2-ablation
table2-ablation:
	$(FLOWVAE) sweep $(foreach row,$(sort $(wildcard configs/table2-ablation/*.yaml)),--config $(row)) \
		--out $(ABLATION_OUT) --split valid --no-progress
	$(FLOWVAE) report $(ABLATION_OUT) --out docs/table2-ablation.md

# The paper's Table 3: planar K in {0, 2, 5, 10} on CIFAR-10 3x8x8 patches (logit-normal, D = 192)
# at the paper's settings (500,000 updates each: days on a CPU), then the report with -log p(x)
# and bits/dim beside the paper's values. The first run downloads cifar-10-binary.tar.gz (163 MB).
# A shorter budget: make table3 TABLE3_SET="--set train.steps=20000 --set train.optimizer=adam --set train.lr=1e-3"
TABLE3_OUT ?= runs/table3
TABLE3_SET ?=
table3:
	$(FLOWVAE) sweep --config configs/cifar10_patches.yaml --grid flow.k=0,2,5,10 $(TABLE3_SET) \
		--out $(TABLE3_OUT) --no-progress
	$(FLOWVAE) report $(TABLE3_OUT) --out docs/results-cifar10.md --plot docs/nll_vs_k_cifar10.png

# The paper's Figure 1: hand-set planar and radial layers (K = 1, 2, 10) on a unit Gaussian and on
# a uniform, each panel the exact density of q_K on a grid; the layers are drawn from the seeded
# distributions in flowvae/figures/figure1.yaml. Under a minute on 2 cores; needs no data.
figure1:
	$(PYTHON) -m flowvae.figure1 --out docs/figure1.png

# The posterior view (docs/results.md): planar K = 0, 10, 40 flow VAEs with a 2-D latent space
# (configs/mnist_2d.yaml, each some minutes on 2 cores; trained when absent, resumed when
# interrupted), then q_K(z|x) beside the true posterior p(z|x) of test images 0, 7 and 42 for
# each, one PNG per K and docs/posterior.png with all three.
POSTERIOR_OUT ?= runs/mnist-2d
POSTERIOR_KS ?= 0 10 40
POSTERIOR_IMAGES ?= 0,7,42
posterior:
	for k in $(POSTERIOR_KS); do \
		run=$(POSTERIOR_OUT)/planar-k$$k; \
		if [ -f $$run/run.json ]; then :; \
		elif [ -f $$run/checkpoints/last.pt ]; then \
			$(FLOWVAE) train --config mnist_2d --set flow.k=$$k --out $$run --resume --no-progress || exit 1; \
		else $(FLOWVAE) train --config mnist_2d --set flow.k=$$k --out $$run --no-progress || exit 1; fi; \
		$(FLOWVAE) posterior $$run/checkpoints/best.pt --images $(POSTERIOR_IMAGES) \
			--out docs/posterior-k$$k.png || exit 1; \
	done
	$(PYTHON) -m flowvae.posterior_figure docs/posterior.png $(foreach k,$(POSTERIOR_KS),docs/posterior-k$(k).png)
