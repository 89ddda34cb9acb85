import re

import pytest
import torch

from runtime import init_device


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
