"""ActNorm's data-dependent init under a real 2-process gloo group (CPU): every rank gets the statistics
of the union of the ranks' batches."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lensflow.flows import ActNorm, Glow

BATCHES = {0: 3, 1: 5}  # unequal per-rank batch sizes: the union mean is not the mean of rank means


def _rank_batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCHES[rank], 3, 4, 4, generator=g, dtype=torch.float64)
    return x * (1.0 + 2.0 * rank) + 5.0 * rank  # very different statistics on each rank


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        an = ActNorm(3).double()
        an(_rank_batch(rank))
        glow = Glow(1, 8, 2, 1, hidden=4, init_seed=0)
        glow.initialize(_rank_batch(rank)[:, :1, :, :].repeat(1, 1, 2, 2).float())
        torch.save(
            {"bias": an.bias.detach(), "logs": an.logs.detach(), "glow": glow.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_actnorm_init_averages_over_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["bias"], r1["bias"]) and torch.equal(r0["logs"], r1["logs"])
    union = torch.cat([_rank_batch(0), _rank_batch(1)]).numpy()
    mean = union.mean(axis=(0, 2, 3))
    std = union.std(axis=(0, 2, 3))
    np.testing.assert_allclose(-r0["bias"].numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(np.exp(-r0["logs"].numpy()), std + 1e-6, rtol=1e-12)
    # a per-rank init would differ: check that the ranks' own statistics are far from the union's
    assert np.abs(_rank_batch(0).numpy().mean(axis=(0, 2, 3)) - mean).min() > 1.0
    # every ActNorm of a whole Glow (including those deep inside) is identical across ranks
    g0, g1 = r0["glow"], r1["glow"]
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    assert any(k.endswith("initialized") for k in g0)
