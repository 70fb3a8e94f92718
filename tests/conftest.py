import os
import sys
from pathlib import Path

# Without a GPU, Triton kernels run under Triton's interpreter. It is chosen when triton is
# first imported (its own helpers are jit functions too), so before anything imports it.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
