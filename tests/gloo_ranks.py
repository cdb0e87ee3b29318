"""Two gloo ranks on this machine for the distributed tests: a free loopback port, the per-rank process-group set-up
(one thread per rank; a timeout, so that a stuck peer fails the test instead of hanging CI) and the spawn."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int, timeout_s: float = 120) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))


def spawn(fn, *args) -> None:
    """Run ``fn(rank, port, *args)`` on every rank; an exception in any rank fails the caller."""
    mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=True)


def run_cases(rank: int, port: int, out_dir: str, cases, setup=tuple, timeout_s: float = 90) -> None:
    """On one rank: the process group, then ``case(rank, *setup())`` for each case with a barrier after it; each
    outcome ("ok" or the traceback) goes to ``out_dir/<case name>.<rank>`` for the test to read."""
    init(rank, port, timeout_s=timeout_s)
    try:
        args = setup()
        for case in cases:
            try:
                case(rank, *args)
                result = "ok"
            except Exception:
                result = traceback.format_exc()
            with open(os.path.join(out_dir, f"{case.__name__}.{rank}"), "w") as f:
                f.write(result)
            dist.barrier()
    finally:
        dist.destroy_process_group()
