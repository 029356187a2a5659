# Everything runs from .venv at the repo root; `make test` and `make demo` build it themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
CUDA_ARCHS := 80 90
PYTEST_ARGS ?=

.PHONY: setup test demo demo-dnc bench cuda-check data clean kernel-report docs docs-serve docs-check

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	@$(MAKE) --no-print-directory data
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel ninja
	$(BIN)/pip install --quiet torch==2.13.0 'triton==3.7.*' numpy tqdm matplotlib kornia webdataset \
		pytest pytest-xdist hypothesis mkdocs-material 'mkdocstrings[python]' selenium
	-$(BIN)/pip install --quiet faiss-cpu
	# timm for --arch timm:<name>; torchvision pinned to torch 2.13's release (an unpinned one
	# pulls another torch). Its C++ ops may not load beside the CPU torch: import_timm copes.
	$(BIN)/pip install --quiet timm 'torchvision==0.28.0'
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Debian's Fashion-MNIST (the embedded default data set); skipped with a note where apt is missing.
data:
	@if [ -d $(FMNIST) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "note: $(FMNIST) missing and apt-get not found; install Debian's dataset-fashion-mnist" \
		     "or set SDCLR_FAST_FMNIST_DIR to a folder holding the IDX .gz files"; exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	$$SUDO apt-get install -y -q dataset-fashion-mnist || \
	{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; } || \
	echo "note: could not install dataset-fashion-mnist; set SDCLR_FAST_FMNIST_DIR instead"

# The CUDA sources must compile on their own even on a machine without a GPU, with the flags torch's
# own extension build passes to nvcc, and without a warning.
cuda-check: $(STAMP)
	@if ! command -v nvcc >/dev/null; then echo "cuda-check: nvcc not found, skipping the CUDA compile check"; exit 0; fi; \
	flags=$$($(BIN)/python -c "from torch.utils.cpp_extension import include_paths, COMMON_NVCC_FLAGS as f; \
		print(' '.join(['-I' + p for p in include_paths()] + f))"); \
	for cu in csrc/*.cu; do for a in $(CUDA_ARCHS); do \
		echo "nvcc -c $$cu (sm_$$a)"; \
		out=$$(nvcc -c $$cu -o /tmp/sdclr_fast_$$(basename $$cu .cu)_sm$$a.o -std=c++20 -O3 \
			-gencode arch=compute_$$a,code=sm_$$a $$flags -DSDCLR_FAST_WITH_CUDA=1 2>&1) || { echo "$$out"; exit 1; }; \
		if echo "$$out" | grep -qi warning; then echo "$$out"; echo "cuda-check: nvcc warned"; exit 1; fi; \
	done; done

test: $(STAMP) cuda-check
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m sdclr_fast demo

demo-dnc: $(STAMP)
	$(BIN)/python -m sdclr_fast demo --methods simclr sdclr dnc

bench: $(STAMP)
	$(BIN)/python -m sdclr_fast bench

# Static sm_90 / sm_80 report of every Triton kernel variant beside the tutorial anchors (no GPU):
# bench/results/kernel_report.{json,md}
kernel-report: $(STAMP)
	$(BIN)/python bench/kernel_report.py

# The documentation site (mkdocs.yml): strict, so a broken link or a missing API entry fails.
export NO_MKDOCS_2_WARNING := 1
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

# Every built page in headless Chromium (Debian's chromium + chromium-driver, installed where
# missing): console errors, images that did not load and dead internal links fail; screenshots
# of the home page and an API page go to site-check/.
docs-check: docs
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		$$SUDO apt-get install -y -q chromium chromium-driver || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }; fi
	$(BIN)/python docs/check_site.py site --screenshots site-check

clean:
	rm -rf build *.egg-info sdclr_fast/_C*.so
