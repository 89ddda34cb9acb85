"""Shared test fixtures: a small random data folder (data.write_random_folder)."""
import os
import sys

import pytest

# Tiny models run fastest on one thread, and pytest often runs beside a script it launched: two
# OpenMP threads that wait on a busy core crawl (20x on the 2-core box). Set before torch is
# imported; inherited.
os.environ['OMP_NUM_THREADS'] = '1'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# noqa: E402,F401  (tests import it from here)
from data import write_random_folder as make_data_folder


@pytest.fixture
def data_folder(tmp_path):
    return make_data_folder(str(tmp_path / 'data'))
