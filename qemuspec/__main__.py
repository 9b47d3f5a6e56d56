"""`python -m qemuspec`: the same command as `qemuspec`."""

from qemuspec.cli.main import run

run()
