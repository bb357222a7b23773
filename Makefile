# pcam-repro: `make help` lists the targets. `make reproduce` and `make test` install
# everything into .venv on first use, so each is a single command on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SHARED_SUBSET := ../shared/data/pcam-real-subset
TEST_REPORTS := $(or $(TMPDIR),/tmp)/pcam-repro-test-reports
TEST_RUNS := $(or $(TMPDIR),/tmp)/pcam-repro-test-runs

.DEFAULT_GOAL := help
.PHONY: help install reproduce test test-bench lab bench lint notebooks real-subset clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[dev]"
	$(VPY) -m ipykernel install --sys-prefix --name pcam-repro --display-name "pcam-repro (.venv)" >/dev/null
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install pcamlib with every dependency (pinned torch)

# The sample runs take minutes: they are trained anew, so the report is this code's output.
reproduce: $(STAMP) ## Regenerate reports/sample/ from the notebooks (generates the sample data)
	rm -rf runs/sample
	$(VENV)/bin/pcamlib reproduce --profile sample

# The end-to-end runs of the benchmark scripts (tiny sizes, ~4 min) are left to test-bench,
# which `make bench` runs first: they check the measuring tools, and CI keeps under 20 min.
test: $(STAMP) ## Run the tests: unit, papermill, nbval over notebooks/, sample-report regression
	rm -rf $(TEST_REPORTS) $(TEST_RUNS)
	PCAM_REPORTS_ROOT=$(TEST_REPORTS) PCAM_RUNS_ROOT=$(TEST_RUNS) $(VPY) -m pytest tests notebooks --nbval \
		--nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout=1800 -p no:cacheprovider --durations=15 -m "not bench_run"

test-bench: $(STAMP) ## Run each benchmark script end to end on tiny sizes (checks the tools)
	$(VPY) -m pytest tests/test_bench.py tests/test_bench_predict.py -m bench_run -p no:cacheprovider

lab: $(STAMP) ## Start JupyterLab with the project's kernel
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: test-bench ## Run the CPU benchmarks into reports/bench/ (ratios, with a summary)
	$(VPY) bench/run_all.py --out reports/bench

lint: $(STAMP) ## ruff over the package, tests and benchmarks
	$(VENV)/bin/ruff check pcamlib tests bench

notebooks: $(STAMP) ## Re-execute notebooks/ in place with their defaults (refresh committed outputs)
	$(VENV)/bin/pcamlib refresh-notebooks

real-subset: $(STAMP) ## Import ../shared's real PCam subset and reproduce the real-subset report
	test -d data/real-subset || $(VENV)/bin/pcamlib import folders $(SHARED_SUBSET) --dest data/real-subset
	$(VENV)/bin/pcamlib reproduce --profile real-subset

clean: ## Remove generated data, runs and test outputs (keeps .venv and reports/)
	rm -rf data/sample runs $(TEST_REPORTS) $(TEST_RUNS)
