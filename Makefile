# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsilo-installed

# Flower must never try to download at run time, nor phone home.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a looser spec would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# The example model package the README and the tests bring as "your own model".
	$(PY) -m pip install --quiet -c constraints.txt -e examples/acme-models
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsilo simulate --departments 10 --rounds 20 --dataset digits \
	    --partition dirichlet:0.5 --target-epsilon 8 --max-grad-norm 1.0 \
	    --delta 1e-5 --max-epsilon 8 --out runs/demo

# Two workers, a test file each: most tests wait on real processes (Flower, Ray, nginx)
# rather than compute, and a file keeps its module-wide federation to itself (tests/conftest.py
# keeps files that share a session-wide fixture together).
# More pytest options after them: make test PYTEST_ARGS="-k policy --junitxml=times.xml".
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 --strict-markers $(PYTEST_ARGS)

# The fast tier (at most 10 min on 2 cores): every unit and in-process test, a real simulation,
# a real TLS deployment through nginx, the intruder and the policy tests.
test: $(STAMP)
	$(PYTEST) -m "not slow"

# Everything (at most 30 min on 2 cores): also the tests marked slow (crash and resume,
# robustness over real deployments, the benchmark smoke run, Ray's listeners). CI runs this.
test-all: $(STAMP)
	$(PYTEST)

# The documentation site (docs/, mkdocs.yml) into site/. --strict: a broken link or anchor
# fails the build. The CLI and run-settings reference pages are generated from the code.
.PHONY: docs
docs: $(STAMP)
	$(PY) -c "import mkdocs, material" 2>/dev/null \
	    || $(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache
