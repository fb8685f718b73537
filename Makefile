# flowvae — common tasks. `make setup` installs and runs the main job; `make test` runs the tests.
PYTHON ?= python
FLOWVAE ?= $(PYTHON) -m flowvae
RUN ?= runs/energy-U1-planar-k32

.PHONY: setup install train test test-fast lint format bench figure3 mnist-quick

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

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

bench:
	$(PYTHON) benchmarks/run.py

mnist-quick:
	$(FLOWVAE) train --config configs/mnist_quick.yaml
