# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests and the demo read the offline copies of the datasets when they exist.
SHARED_DATA := $(abspath ../shared/data)
export ASLORA_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/glue),$(SHARED_DATA),)
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a CPU build of this version is served locally, and
	# an unpinned torch would pull a several-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aslora compare configs/demo.toml --methods fedavg,ffa,rolora,aslora --seeds 1 --workers 2

# Most of the suite is single-threaded Python (accounting, Flower, PEFT): two workers with one
# torch thread each use both cores; a file's tests stay together (Flower's fixed ports).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
