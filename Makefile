# Conveniences around scripts/ (which work without make on a fresh machine).
.PHONY: run test bench-setup clean

run:
	./scripts/run

test:
	./scripts/test

# Benchmarks (not part of the tests): the venv plus the aiosmtpd peer. See bench/README.md.
bench-setup:
	./scripts/bench-setup

clean:
	rm -rf .venv build *.egg-info var
