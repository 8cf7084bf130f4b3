import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bin_path(name: str) -> str:
    "A console script of the environment running the tests."
    import sys
    return str(Path(sys.executable).parent / name)
