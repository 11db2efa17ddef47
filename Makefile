# perceiver_np: everything a fresh machine needs is installed into .venv by these targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck demo bench bench-model bench-pretrained bench-kernel bench-gemm bench-distributed clean

# dev: the test tools (and the notebooks' runner); distributed: Dask, for tests/test_distributed.py;
# mkl, blis: Intel MKL and BLIS, for tests/test_blas.py's MKL and BLIS paths;
# compare: torch (the CPU build this machine keeps on disk, pinned) and
# transformers, so that the cross-checks against them run instead of skipping. Then krasserm's
# perceiver-io for tests/test_krasserm.py: its 0.11.0 (the last) says Python <3.11 and pins its
# training stack (pytorch-lightning, torchmetrics<0.10, einops<0.5, ...), so it is installed
# without its dependencies and with the Python bound overridden: only its core modules
# (perceiver.model.core) are used, which need torch, einops (from compare) and fairscale's
# checkpoint_wrapper, and they run on this Python.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,compare,distributed,mkl,blis]'
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python perceiver-io==0.11.0 fairscale==0.4.13
	touch $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(VENV)/.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest

$(VENV)/.demo: $(STAMP)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $(VENV)/.demo

# Train a Perceiver IO on scikit-learn's bundled digits (and decode a signal at 256 queries).
demo: $(VENV)/.demo
	$(PY) -m perceiver_np.demo --out demo_out

# The benchmarks: the whole model against PyTorch (docs/performance.md, ~10 min), the published
# Perceivers at their released sizes against HF transformers (docs/performance-pretrained.md,
# minutes: optical flow is ~1.9 TFLOP a forward), then the tiled attention kernel on its own
# (docs/performance-kernel.md, ~15 min). Each prints its table too.
bench: bench-model bench-pretrained bench-kernel bench-gemm bench-distributed

bench-model: $(VENV)/.bench
	$(PY) benchmarks/bench_model.py --markdown docs/performance.md --plot docs/model_time.png

bench-pretrained: $(VENV)/.bench
	$(PY) benchmarks/bench_pretrained.py --markdown docs/performance-pretrained.md

# The seed model's products, library against library (OpenBLAS, MKL, BLIS, torch; 1 and 2 threads).
bench-gemm: $(VENV)/.bench
	$(PY) benchmarks/bench_gemm.py --markdown docs/performance-gemm.md

# Batch prediction on a local Dask cluster (1 and 2 workers) against single-process predict.
bench-distributed: $(STAMP)
	$(PY) benchmarks/bench_distributed.py --markdown docs/performance-distributed.md

bench-kernel: $(VENV)/.bench
	$(PY) benchmarks/bench_attention.py --markdown docs/performance-kernel.md --plot docs/attention_time.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info
