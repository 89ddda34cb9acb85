import re

import numpy as np
import pytest
import torch

from runtime import (init_device, mfu, optimizer_names, peak_flops, peak_memory_mb, rank_batches,
                     renamed, to_device)


@pytest.fixture(autouse=True)
def no_torchrun(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_names_the_setting_and_the_way_out():
    with pytest.raises(SystemExit, match=re.escape(
            "config error: device='cuda' but torch.cuda.is_available() is False on this machine: "
            "use --device=cpu or --device=auto")):
        init_device('cuda', 'float32')
    assert init_device('auto', 'float32') == ('cpu', 0, 0, 1)


def test_unknown_device_and_a_missing_cuda_index_are_refused(monkeypatch):
    with pytest.raises(SystemExit, match=r"device should be 'auto', 'cpu', 'cuda' or "
                                         r"'cuda:N', got 'gpu'"):
        init_device('gpu', 'float32')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(SystemExit, match=re.escape(
            "config error: device='cuda:2' but this machine has 2 CUDA device(s), "
            "cuda:0 to cuda:1")):
        init_device('cuda:2', 'float32')
    assert init_device('cuda:1', 'float32') == ('cuda:1', 0, 0, 1)
    assert init_device('cpu', 'float32') == ('cpu', 0, 0, 1)


def test_rank_batches_cover_every_row_once_and_pad_collective_rounds():
    # 7 rows, batches of 2, 3 ranks: rounds of 6 rows; in the second round only rank 0 has a row
    per_rank = [list(rank_batches(7, 2, rank, 3, every_round=True)) for rank in range(3)]
    real = sorted(int(r) for batches in per_rank for rows, w in batches if w for r in rows)
    assert real == list(range(7))
    assert [len(batches) for batches in per_rank] == [2, 2, 2]  # FSDP: every rank every round
    assert [w for _, w in per_rank[2]] == [1.0, 0.0] and per_rank[2][1][0].tolist() == [6]
    assert [len(list(rank_batches(7, 2, rank, 3, every_round=False))) for rank in range(3)] == \
        [2, 1, 1]


def test_renamed_maps_optimizer_keys_both_ways():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    names = optimizer_names(model, optimizer)
    assert names == ['weight', 'bias']
    state = optimizer.state_dict()
    by_name = renamed(state, names)
    assert set(by_name['state']) == {'weight', 'bias'}
    back = renamed(by_name, {n: i for i, n in enumerate(names)})
    assert back['param_groups'] == state['param_groups']
    assert all(torch.equal(back['state'][i]['exp_avg'], state['state'][i]['exp_avg'])
               for i in (0, 1))


def test_cpu_helpers():
    assert mfu(1e12, 'cpu', torch.bfloat16, 1) is None
    assert peak_flops('NVIDIA H100 80GB HBM3', torch.float32) == 989e12 / 2
    x = to_device(np.arange(6, dtype=np.float16).reshape(2, 3), 'cpu')
    assert x.dtype == torch.float16 and x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert peak_memory_mb('cpu') > 0


def test_group_of_one_without_torchrun():
    import torch.distributed as dist
    assert init_device('cpu', 'float32', group=True) == ('cpu', 0, 0, 1)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
