#!/usr/bin/env python3
"""Peak RSS of `qemuspec cp` moving a large file into the test guest and back (default 256 MiB),
against the file's size: streaming keeps it flat. Runs the test that checks it, with a bigger file;
hold /work/coord/vm.lock (or run alone): it boots a guest."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    size = sys.argv[1] if len(sys.argv) > 1 else "256"
    env = {**os.environ, "CP_TEST_MIB": size}
    print(f"file size: {size} MiB")
    sys.exit(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-s",
                "-p",
                "no:cacheprovider",
                os.path.join(ROOT, "tests", "test_cli_commands.py"),
                "-k",
                "cp_streams",
            ],
            env=env,
        ).returncode
    )
