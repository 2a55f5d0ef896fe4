"""hmm.malloc: hmmd (and SDK device programs) raise glibc's malloc thresholds at start."""

import subprocess
import sys

from hmmd.config import Config


def test_tune_malloc_sets_glibc_thresholds_or_nothing() -> None:
    # In a child: the settings last for the process.
    code = ("import os; from hmm.malloc import tune_malloc; os.environ['HMM_MALLOC_KEEP_MIB'] = '0'; "
            "print(tune_malloc(0), tune_malloc(), tune_malloc(64))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False", "True"], r.stderr


def test_hmmd_flag() -> None:
    assert Config.from_env_and_args([], env={}).malloc_keep_mib == 256
    assert Config.from_env_and_args(["--malloc-keep-mib", "0"], env={}).malloc_keep_mib == 0
    assert Config.from_env_and_args([], env={"HMMD_MALLOC_KEEP_MIB": "64"}).malloc_keep_mib == 64
