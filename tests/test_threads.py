"""Threads that fit the machine (thl_np._threads): the OpenMP wait policy set before Numba's import,
THL_NP_THREADS / --threads, and the decode step's thread count."""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from click.testing import CliRunner
from test_fast_decode import small_config

from thl_np import InputError, THLModel, _threads
from thl_np.cli import cli, main
from thl_np.engines.decoder import FastDecoder


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    """Each test starts automatic (no --threads, no THL_NP_THREADS) and leaves it so."""
    monkeypatch.delenv(_threads.ENV, raising=False)
    monkeypatch.setattr(_threads, "_override", None)
    yield
    _threads._override = None
    os.environ.pop(_threads.ENV, None)


@pytest.mark.parametrize("text, want", [("3", 3), (" 1 ", 1), ("auto", None), ("", None), ("AUTO", None)])
def test_env_is_read(monkeypatch, text, want):
    monkeypatch.setenv(_threads.ENV, text)
    assert _threads.requested() == want


@pytest.mark.parametrize("text", ["two", "-1", "1.5", "0x2"])
def test_bad_env_is_one_clear_error(monkeypatch, capsys, text):
    monkeypatch.setenv(_threads.ENV, text)
    with pytest.raises(InputError, match="THL_NP_THREADS = .*: use a positive number of threads, or 'auto'"):
        _threads.requested()
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: THL_NP_THREADS") and len(err.strip().splitlines()) == 1


def test_set_threads_sets_the_environment_too():
    _threads.set_threads(2)
    assert _threads.requested() == 2 and os.environ[_threads.ENV] == "2"
    assert _threads.choose(1.0, busy=5) == min(2, _threads.pool_size())  # fixed: neither work nor load matter
    _threads.set_threads(None)
    assert _threads.requested() is None and _threads.ENV not in os.environ
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="positive number of threads"):
            _threads.set_threads(bad)


def test_cli_threads_option(tmp_path):
    result = CliRunner().invoke(cli, ["--threads", "1", "init", "--out", str(tmp_path / "m"), "--dim", "16",
                                      "--memory-slots", "8", "--local-window", "4", "--num-tiers", "2",
                                      "--head-dim", "8", "--read-topk", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _threads.requested() == 1
    result = CliRunner().invoke(cli, ["--threads", "0", "info"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_automatic_count():
    """One thread for a small step or a machine with no idle core; else the idle cores, at most the
    cores and Numba's count."""
    most = min(_threads.cores(), numba.get_num_threads())
    assert _threads.choose(1 << 20, busy=0) == 1
    assert _threads.choose(1 << 40, busy=0) == most
    assert _threads.choose(1 << 40, busy=_threads.cores()) == 1
    assert _threads.choose(1 << 40, busy=1) == max(1, min(most, _threads.cores() - 1))
    assert isinstance(_threads.others_running(), int) and _threads.others_running() >= 0


def test_decoder_threads_and_restore(monkeypatch):
    model = THLModel(small_config(), seed=0)
    dec = FastDecoder(model)
    assert dec.threads.count == 1  # a tiny model: its kernels are too small to gain from threads
    before = numba.get_num_threads()
    dec.step([1])
    assert numba.get_num_threads() == before  # the step's count is restored after it
    monkeypatch.setenv(_threads.ENV, "1")
    big = FastDecoder(model)
    big.threads.work_bytes = 1 << 40
    assert big.threads.count == 1


def test_wait_policy_is_set_before_numba_and_user_values_are_kept():
    code = ("import os, thl_np, numba; from numba.core import config; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME'), "
            "os.environ.get('GOMP_SPINCOUNT'), "
            "config.THREADING_LAYER_PRIORITY[0], config.NUMBA_NUM_THREADS)")

    def run(**env):
        base = {k: v for k, v in os.environ.items()
                if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER",
                             "NUMBA_THREADING_LAYER_PRIORITY", "NUMBA_NUM_THREADS", _threads.ENV)}
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    assert run()[:4] == ["None", "0", _threads.GNU_SPIN_COUNT, "omp"]
    assert run(OMP_WAIT_POLICY="ACTIVE", KMP_BLOCKTIME="200")[:3] == ["ACTIVE", "200", "None"]
    assert run(OMP_WAIT_POLICY="PASSIVE")[:3] == ["PASSIVE", "0", "None"]  # the user's policy: no spin count on top
    assert run(GOMP_SPINCOUNT="1000")[:3] == ["None", "0", "1000"]
    assert run(NUMBA_THREADING_LAYER_PRIORITY="workqueue omp tbb")[3] == "workqueue"
    many = _threads.cores() + 3
    assert run(THL_NP_THREADS=str(many))[4] == str(many)  # a pool large enough for the count asked for


def test_kernels_agree_on_any_thread_count(monkeypatch):
    """Threads change the speed, never the numbers: the default config's kernel split over 1 or 2
    threads gives the same logits (each row is one thread's dot product)."""
    model = THLModel(small_config(dtype="float32"), seed=0)
    ids = np.arange(12)[None] % 37
    out = []
    for n in ("1", str(min(2, _threads.pool_size()))):
        monkeypatch.setenv(_threads.ENV, n)
        out.append(model(ids)[0])
    assert np.array_equal(out[0], out[1])
