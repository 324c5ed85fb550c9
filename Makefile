# The two commands of the README: `make demo` and `make test`. Both set the
# machine up first (idempotent; see scripts/setup.sh).
.PHONY: setup demo test soak lint typecheck clean

VENV := .venv/bin

setup:
	@scripts/setup.sh

# The main job: the fail-slow demonstration (a slow mirror leg detected,
# demoted and re-admitted). The demo itself runs natively where the kernel
# has ublk (as root), else in one boot of the qemu test bed.
demo: setup
	$(VENV)/ublkml demo

# The whole suite. Tests that need ublk run in the test bed when the kernel
# lacks the driver, and are counted in the one pytest summary.
test: setup
	$(VENV)/python -m pytest

# The soak-sized counts of the tests that have them (marked soak): hundreds of
# add/delete cycles, tens of SIGKILLs; `make test` runs the same tests smaller.
# Figures: docs/reliability.md.
soak: setup
	$(VENV)/python -m pytest --soak -m soak

lint:
	$(VENV)/ruff check ublk_driver kernel_agent ml bench tests

typecheck:
	$(VENV)/mypy ublk_driver kernel_agent ml bench

clean:
	rm -rf build *.egg-info ublk_driver/_ublkml_cffi.* .pytest_cache .mypy_cache
