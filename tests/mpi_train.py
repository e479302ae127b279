"""One rank of a small training run under MPI, for tests/test_distributed.py (run as ``mpirun -n N python
tests/mpi_train.py OUT ...``). Faults are injected from the run's own log callback, at a chosen step on a
chosen rank: a SIGINT (a stop request), a SIGKILL, or an exception (the time of a kill or an exception is
written to OUT/fault_at). Each rank writes OUT/report-DTYPE-RANK.json per run: its rank, the step reached,
and a digest of the weights it holds (all ranks must hold the same)."""
import argparse
import hashlib
import json
import os
import signal
import sys
import time

from thl_np.config import THLConfig
from thl_np.training.trainer import TrainConfig, train

TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        b"foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
        b"Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n")
# 5 lanes of 68 bytes: 5 chunks of 12 per pass, so 10 steps wrap the lanes (and drop the state) once


def model_config(dtype="float64") -> THLConfig:
    return THLConfig(dim=16, vocab_size=259, memory_slots=8, head_dim=8, query_dim=8, local_window=8,
                     dtype=dtype)


def train_config(**changes) -> TrainConfig:
    """5 lanes: 3 + 2 on two ranks, 2 + 2 + 1 on three; 2 held-out lanes: one rank of three has none."""
    base = dict(steps=10, seq_len=12, batch_size=5, lr=1e-2, warmup=2, eval_every=5, eval_lanes=2,
                checkpoint_every=5, held_out_fraction=0.1, seed=3)
    base.update(changes)
    return TrainConfig(**base)


def weights_digest(params) -> str:
    h = hashlib.sha256()
    for name, array in params.items():
        h.update(name.encode() + array.tobytes())
    return h.hexdigest()[:16]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtypes", default="float64", help="comma-separated: one run per dtype, into OUT/DTYPE")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fault", choices=["interrupt", "kill", "raise"])
    p.add_argument("--at-step", type=int, default=3)
    p.add_argument("--on-rank", type=int, default=1)
    args = p.parse_args(argv)

    from thl_np.model import THLModel
    from thl_np.training.distributed import detect_world

    world = detect_world()
    os.makedirs(args.out, exist_ok=True)

    def log(event):
        if event["event"] != "step" or event["step"] != args.at_step or world.rank != args.on_rank:
            return
        if args.fault == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
            return
        if args.fault is not None:
            with open(os.path.join(args.out, "fault_at"), "w") as f:
                f.write(repr(time.time()))
        if args.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif args.fault == "raise":
            raise RuntimeError(f"injected failure on rank {world.rank} at step {event['step']}")

    for dtype in args.dtypes.split(","):
        tc = train_config(steps=args.steps)
        model = THLModel(model_config(dtype), seed=tc.seed)  # an object, so its trained weights can be read
        result = train(model, TEXT, os.path.join(args.out, dtype), tc, log=log, world=world)
        report = {"dtype": dtype, "rank": world.rank, "size": world.size, "step": result.step,
                  "interrupted": result.interrupted, "weights": weights_digest(model.params)}
        with open(os.path.join(args.out, f"report-{dtype}-{world.rank}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    sys.exit(main())
