# Set-up and checks. `make demo` and `make test` install what is missing first;
# both are idempotent, and a second run installs nothing.

VENV    ?= .venv
PYTHON  ?= python3
STAMP   := $(VENV)/.installed
SYSTEM_TOOLS := Orthanc storescp findscu movescu getscu dcmqrscp wlmscpfs

.PHONY: demo test lint system-packages clean

demo: $(STAMP) system-packages
	$(VENV)/bin/fdqr demo

test: $(STAMP) system-packages
	$(VENV)/bin/pytest -q

LINT_PATHS = $(wildcard engine tests bench)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages for the real peers: Orthanc (remote sites, local PACS) and
# DCMTK (clients and servers in tests). Installs only when a tool is missing.
system-packages:
	@missing=""; for tool in $(SYSTEM_TOOLS); do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing orthanc and dcmtk (missing:$$missing)"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -q orthanc dcmtk >/dev/null \
	    || { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q orthanc dcmtk >/dev/null; }; \
	fi

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
