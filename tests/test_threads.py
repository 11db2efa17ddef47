"""The thread knob: Numba's pool and BLAS's together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import pytest

import perceiver_np as pnp


def test_set_num_threads_sets_numba_and_blas():
    before = numba.get_num_threads()
    try:
        pnp.set_num_threads(1)
        threads = pnp.get_num_threads()
        assert threads["numba"] == 1
        blas = [v for k, v in threads.items() if k.startswith("blas:")]
        assert blas and all(v == 1 for v in blas)
    finally:
        pnp.set_num_threads(before)
    assert pnp.get_num_threads()["numba"] == before


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="n: expected an integer from 1 to NUMBA_NUM_THREADS"):
        pnp.set_num_threads(bad)


def test_the_environment_variable_is_honoured_on_import():
    code = "import json, perceiver_np as p; print(json.dumps(p.get_num_threads()))"
    env = {**os.environ, "PERCEIVER_NP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads = json.loads(out.stdout)
    assert threads["numba"] == 1 and all(v == 1 for k, v in threads.items() if k.startswith("blas:"))
    env["PERCEIVER_NP_NUM_THREADS"] = "two"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "PERCEIVER_NP_NUM_THREADS: expected an integer" in bad.stderr
