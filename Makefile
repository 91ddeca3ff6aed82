# The two commands of README.md. Both build .venv from requirements.txt first (once;
# again whenever requirements.txt changes).
PY := .venv/bin/python

.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.PHONY: run test
run: .venv/.installed  ## the whole notebook pipeline on the built-in default (smoke, CPU)
	$(PY) -m tinymim run --profile smoke

test: .venv/.installed  ## unit tests + every notebook under nbmake (a cell may train for minutes: 30-min cell limit)
	$(PY) -m pytest tests --nbmake --nbmake-timeout=1800 notebooks -p no:cacheprovider
