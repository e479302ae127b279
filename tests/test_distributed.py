"""Data-parallel training over MPI (thl_np/training/distributed.py).

Without MPI: the lane blocks, the exactness argument (the ranks' scaled gradients sum to the batch's), the
carried state split and joined, and the world detection. Under ``mpirun`` (tests/mpi_train.py, 2 and 3 ranks
oversubscribed on however many cores there are; skipped without mpi4py and an ``mpirun``): the same weights
as one process, an interrupted run resumed to the same weights, and a failing or killed rank ending the job.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpi_train import TEXT, model_config, train_config

from thl_np.errors import ConfigError
from thl_np.training import checkpoint as ckpt
from thl_np.training import distributed
from thl_np.training.distributed import World, detect_world, draw_lanes, join_lanes, take_lanes
from thl_np.training.trainer import _new_rng, train

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_train.py")
LAUNCHER_VARIABLES = distributed.SIZE_VARIABLES + distributed.RANK_VARIABLES


def rank(r, n) -> World:
    w = World()
    w.rank, w.size = r, n
    return w


# ---------------------------------------------------------------------- no MPI needed
@given(st.integers(1, 40), st.integers(1, 12))
def test_lane_blocks_cover_the_batch_in_order(batch, ranks):
    blocks = [rank(r, ranks).lanes(batch) for r in range(ranks)]
    assert [i for b in blocks for i in range(batch)[b]] == list(range(batch))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1


@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_each_rank_draws_its_lanes_of_one_process_uniforms(T, B, J, ranks, seed):
    """The routing noise does not depend on N: the ranks' draws, side by side, are one process's draw, bit for
    bit, and every rank's generator ends where one process's does."""
    whole_rng = _new_rng(seed)
    whole = whole_rng.random((T, B, 2, J))
    parts = []
    for r in range(ranks):
        rng = _new_rng(seed)
        parts.append(draw_lanes(rng, (T, B, 2, J), rank(r, ranks).lanes(B)))
        assert rng.bit_generator.state == whole_rng.bit_generator.state
    assert np.array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_ranks_scaled_gradients_sum_to_the_batch_gradient(ranks):
    """The exactness argument of the module docstring, on one process: each rank's lanes with their slice of
    the batch's uniforms, its mean gradient scaled by B_r/B, summed, equal the whole batch's (float64)."""
    from thl_np.model import THLModel, value_and_grad

    model = THLModel(model_config(), seed=1)
    rng = np.random.default_rng(0)
    B, T, c = 5, 9, model.config
    ids = rng.integers(0, 256, (B, T + 1))
    U = rng.random((T, B, c.num_heads, c.memory_slots))
    state = value_and_grad(model, ids[:, :-1], ids[:, 1:], gumbel_uniform=U, return_state=True)[2]
    loss, grads, state_out = value_and_grad(model, ids[:, :-1], ids[:, 1:], state=state, gumbel_uniform=U,
                                            return_state=True)
    total_loss, total = 0.0, {k: np.zeros_like(g) for k, g in grads.items()}
    outs = []
    for r in range(ranks):
        lanes = rank(r, ranks).lanes(B)
        if lanes.stop == lanes.start:
            continue
        share = (lanes.stop - lanes.start) / B
        part_loss, part, part_state = value_and_grad(model, ids[lanes, :-1], ids[lanes, 1:],
                                                     state=take_lanes(state, lanes), gumbel_uniform=U[:, lanes],
                                                     return_state=True)
        total_loss += share * part_loss
        for k in total:
            total[k] += share * part[k]
        outs.append(part_state)
    assert total_loss == pytest.approx(loss, rel=1e-14)
    for k, g in grads.items():
        np.testing.assert_allclose(total[k], g, rtol=0, atol=1e-14 * max(1.0, float(np.abs(g).max())), err_msg=k)
    joined = join_lanes(outs)
    for key, array in state_out.arrays().items():
        np.testing.assert_allclose(joined.arrays()[key], array, rtol=0, atol=1e-14, err_msg=key)


def test_state_lanes_split_and_join_back():
    from thl_np.state import InferenceState

    rng = np.random.default_rng(2)
    state = InferenceState.init(5, model_config())
    state = InferenceState(**{**state.__dict__, "memory": rng.random(state.memory.shape),
                              "last_read": rng.integers(0, 9, state.last_read.shape), "timestep": 7,
                              "tiers": [rng.random(s.shape) for s in state.tiers]})
    parts = [take_lanes(state, rank(r, 3).lanes(5)) for r in range(3)]
    assert [p.batch_size for p in parts] == [1, 2, 2] and all(p.timestep == 7 for p in parts)
    joined = join_lanes(parts)
    for key, array in state.arrays().items():
        assert np.array_equal(joined.arrays()[key], array), key
    assert take_lanes(None, slice(0, 1)) is None and join_lanes([None, None]) is None


def test_world_detection_outside_mpirun(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    had_mpi4py = "mpi4py" in sys.modules
    assert detect_world() is distributed.SINGLE
    assert ("mpi4py" in sys.modules) == had_mpi4py  # a plain run does not even import mpi4py
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"--distributed needs mpi4py.*thl-np\[mpi\]"):
        detect_world(required=True)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert detect_world() is distributed.SINGLE  # one process launched by mpirun: nothing to share
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="3 processes.*mpi4py is not installed"):
        detect_world()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMIX_RANK", "2")
    with pytest.raises(ConfigError, match="mpi4py is not installed"):
        detect_world()


def test_cli_distributed_without_mpi4py_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from thl_np.cli import main

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    (tmp_path / "t.txt").write_bytes(TEXT)
    code = main(["train", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--distributed"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --distributed needs mpi4py") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- under mpirun
def _mpirun():
    """The launcher beside this Python (the [mpi] extra's wheel puts it there), else on PATH."""
    for name in ("mpirun", "mpiexec"):
        beside = os.path.join(os.path.dirname(sys.executable), name)
        if os.access(beside, os.X_OK):
            return beside
        if shutil.which(name):
            return shutil.which(name)
    return None


MPIRUN = _mpirun()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIRUN is None,
    reason="needs mpi4py and an mpirun: pip install -e '.[mpi]' (the [test] extra includes it)")

# Open MPI refuses root and more ranks than cores unless told; MPICH ignores these.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}


def launch(n, *argv, timeout=180):
    """``mpirun -n N python ARGV...``: (return code, stdout, stderr, time it ended)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(MPI_ENV)
    proc = subprocess.run([MPIRUN, "-n", str(n), sys.executable, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr, time.time()


def rank_reports(out, dtype="float64"):
    """What each rank of a tests/mpi_train.py run wrote about its run, by rank."""
    names = sorted(n for n in os.listdir(out) if n.startswith(f"report-{dtype}-"))
    return sorted((json.loads((out / n).read_text()) for n in names), key=lambda r: r["rank"])


def load_run(out):
    from thl_np.model import THLModel

    latest = ckpt.latest_checkpoint(str(out))
    model = THLModel.from_pretrained(os.path.join(latest, "model"))
    with np.load(os.path.join(latest, "train_state.npz")) as z:
        state = {k: z[k] for k in z.files}
    return {"params": model.params, "state": state, "log": ckpt.read_csv(os.path.join(latest, "log.csv")),
            "eval": ckpt.read_csv(os.path.join(latest, "eval.csv")), "step": int(os.path.basename(latest)[5:])}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same runs in this process (this also compiles the kernels the ranks load)."""
    out = tmp_path_factory.mktemp("one")
    for dtype in ("float64", "float32"):
        train(model_config(dtype), TEXT, out / dtype, train_config(), world=distributed.SINGLE)
    return out


@pytest.fixture(scope="module")
def ranks_runs(one_process, tmp_path_factory):
    """``mpirun -n N tests/mpi_train.py``: float64 and float32 runs, launched once per N."""
    done = {}

    def get(n):
        if n not in done:
            out = tmp_path_factory.mktemp(f"ranks{n}")
            code, _, stderr, _ = launch(n, DRIVER, out, "--dtypes", "float64,float32")
            assert code == 0, stderr[-3000:]
            done[n] = out
        return done[n]

    return get


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_train_as_one_process(one_process, ranks_runs, n):
    out = ranks_runs(n)
    for dtype, atol in (("float64", 1e-12), ("float32", 1e-5)):
        reports = rank_reports(out, dtype)
        assert [r["rank"] for r in reports] == list(range(n)) and all(r["step"] == 10 for r in reports)
        assert len({r["weights"] for r in reports}) == 1  # every rank holds the same weights
        ours, ref = load_run(out / dtype), load_run(one_process / dtype)
        assert ours["step"] == ref["step"] == 10
        for name, w in ref["params"].items():
            np.testing.assert_allclose(ours["params"][name], w, rtol=0, atol=atol, err_msg=f"{dtype} {name}")
        for key, s in ref["state"].items():  # the carried state, gathered from the ranks' lanes
            np.testing.assert_allclose(ours["state"][key], s, rtol=0, atol=atol, err_msg=f"{dtype} {key}")
        rel = 1e-12 if dtype == "float64" else 1e-5
        np.testing.assert_allclose([r["loss"] for r in ours["log"]], [r["loss"] for r in ref["log"]], rtol=rel)
        assert [r["step"] for r in ours["eval"]] == [r["step"] for r in ref["eval"]] == [5, 10]
        np.testing.assert_allclose([r["bits_per_byte"] for r in ours["eval"]],
                                   [r["bits_per_byte"] for r in ref["eval"]], rtol=rel)
    assert sorted(os.listdir(out / "float64")) == sorted(os.listdir(one_process / "float64"))  # rank 0's files
    assert not [n for n in os.listdir(out) if not n.startswith(("float", "report-"))]


@needs_mpi
def test_interrupted_two_rank_run_resumes_to_the_same_weights(ranks_runs, tmp_path):
    """SIGINT to rank 1 alone after step 3: both ranks stop after step 4 (the request travels with step 4's
    Allreduce) and rank 0 checkpoints; ``mpirun -n 2 thl-np train --resume`` then ends where the
    uninterrupted 2-rank run did, bit for bit, with one line of progress per event (rank 0's)."""
    full = ranks_runs(2)
    code, _, stderr, _ = launch(2, DRIVER, tmp_path, "--fault", "interrupt", "--at-step", 3, "--on-rank", 1)
    assert code == 0, stderr[-3000:]
    reports = rank_reports(tmp_path)
    assert [(r["step"], r["interrupted"]) for r in reports] == [(4, True), (4, True)]
    out = tmp_path / "float64"
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000004"

    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    code, stdout, stderr, _ = launch(2, "-m", "thl_np.cli", "train", "--data", data, "--out", out, "--resume",
                                     "--distributed", "--log-every", 1)
    assert code == 0, stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("resuming at step 4 to 10") and lines[-1].startswith("done: step 10/10")
    assert sum(line.startswith("step 7/10") for line in lines) == 1  # rank 0 alone reports
    resumed, ref = load_run(out), load_run(full / "float64")
    for name, w in ref["params"].items():
        assert np.array_equal(resumed["params"][name], w), name
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in ref["log"]]


@needs_mpi
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_within_seconds(tmp_path, fault):
    """An exception on rank 1 (MPI_Abort from its exit) or a SIGKILL (the launcher reaps it): rank 0, waiting
    in step 4's Allreduce, is ended too; the job exits non-zero with a message naming the cause."""
    code, stdout, stderr, ended = launch(2, DRIVER, tmp_path, "--fault", fault, "--at-step", 3, "--on-rank", 1,
                                         timeout=120)
    failed_at = float((tmp_path / "fault_at").read_text())
    assert code != 0
    assert ended - failed_at < 15, f"the job took {ended - failed_at:.1f} s to end"
    text = (stdout + stderr).lower()
    if fault == "raise":
        assert "injected failure on rank 1 at step 3" in text
        assert "rank 1 of 2 stopped before the run finished" in text
    else:
        assert "signal 9" in text or "killed" in text
    assert rank_reports(tmp_path) == []  # no rank finished its run
