# The two commands of the README: `make demo` and `make test`. Both set the
# machine up first (idempotent; see scripts/setup.sh).
.PHONY: setup demo test lint typecheck clean

VENV := .venv/bin

setup:
	@scripts/setup.sh

# The main job: a loop-backed ublk device, fio verify, ext4, a summary.
# Natively where the kernel has ublk, else inside the qemu test bed.
demo: setup
	@if [ -e /dev/ublk-control ]; then \
		$(VENV)/ublkml demo; \
	else \
		$(VENV)/ublkml vm run -- $(abspath $(VENV))/ublkml demo; \
	fi

# The whole suite. Tests that need ublk run in the test bed when the kernel
# lacks the driver, and are counted in the one pytest summary.
test: setup
	$(VENV)/python -m pytest

lint:
	$(VENV)/ruff check ublk_driver kernel_agent ml bench tests

typecheck:
	$(VENV)/mypy ublk_driver kernel_agent ml bench

clean:
	rm -rf build *.egg-info ublk_driver/_ublkml_cffi.* .pytest_cache .mypy_cache
