# mailappliance: the two commands the README opens with.
#   make run   - set up a virtualenv and run the appliance on the embedded defaults
#   make test  - install what the tests need (slapd, ldap-utils, swaks) and run them all

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := slapd ldap-utils swaks openssl

.PHONY: run test venv install system-deps clean bench-setup

venv: $(VENV)/.created
$(VENV)/.created:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# A plain (non-editable) install, exactly as an admin would install it.
install: venv
	$(PY) -m pip install -q --force-reinstall --no-deps . && $(PY) -m pip install -q '.[test]'

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: install
	$(VENV)/bin/twistd -n --pidfile= mailappliance --config etc/mailappliance.toml

test: system-deps install
	$(PY) -m pytest -q -p no:cacheprovider tests

# Benchmarks (not part of the tests): the venv plus the aiosmtpd peer. See bench/README.md.
bench-setup: system-deps install
	$(PY) -m pip install -q aiosmtpd

clean:
	rm -rf $(VENV) build *.egg-info var
