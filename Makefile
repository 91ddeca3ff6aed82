# The two commands of README.md. Both build .venv from requirements.txt first (once;
# again whenever requirements.txt changes).
PY := .venv/bin/python

.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.PHONY: run test unit lab chromium slurm
run: .venv/.installed  ## the whole notebook pipeline on the built-in default (smoke, CPU)
	$(PY) -m tinymim run --profile smoke

test: .venv/.installed chromium slurm  ## unit tests + every notebook under nbmake (a cell may train for minutes: 30-min cell limit)
	$(PY) -m pytest tests --nbmake --nbmake-timeout=1800 notebooks -p no:cacheprovider --durations=25

unit: .venv/.installed  ## the edit-test loop: every test but the notebooks and the browser
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider -q --durations=10

lab: .venv/.installed  ## the notebooks in JupyterLab, with this kit's environment as the kernel
	.venv/bin/jupyter lab notebooks

# the real-browser test (tests/test_browser.py) drives Debian's chromium through Playwright
chromium:
	@command -v chromium >/dev/null || { \
	  APT="$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get -y -q"; \
	  $$APT install chromium || { $$APT update && $$APT install chromium; }; }

# the cluster tests (tests/test_cluster.py) start a real single-node SLURM from Debian's packages
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  APT="$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get -y -q"; \
	  PKGS="slurmctld slurmd slurm-client munge"; \
	  $$APT install --no-install-recommends $$PKGS || { $$APT update && $$APT install --no-install-recommends $$PKGS; }; }
