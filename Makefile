# Two commands do all set-up on a fresh machine:
#   make test   -- create/reuse .venv, install the package with its test extras, run the tests
#   make demo   -- generate the embedded demo dataset, train, evaluate, print the results table
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch 2.13.0 is the CPU build that lies on this machine's disk; any other version
# would download a multi-GB CUDA build. Only the tests need it (their PyTorch references).
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test venv clean demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The demo: generated data (kept between runs), a fresh workdir each time.
DEMO_DATA ?= demo_data
DEMO_WORKDIR ?= demo_workdir

demo: $(STAMP)
	test -f $(DEMO_DATA)/demo_manifest.json || $(PY) -m inpformer_jax.data.demo --out $(DEMO_DATA) --seed 0 --overwrite
	rm -rf $(DEMO_WORKDIR)
	$(PY) -m inpformer_jax.main --config configs/demo.py --workdir $(DEMO_WORKDIR) \
	  --config.data.roots.demo=$(DEMO_DATA)

clean:
	rm -rf $(VENV) .pytest_cache
