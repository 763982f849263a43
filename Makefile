# The README's two commands: `make demo` (the whole pipeline on the offline demo config) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= tune_configs/demo_mmlu_offline.yaml
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/packs.txt
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipelines.run --config $(DEMO_CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
