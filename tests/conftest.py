import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)                     # tiny_models, fixtures
sys.path.insert(0, os.path.dirname(HERE))    # benchmarks.baselines (the published algorithm)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def vlm_qwen2():
    from tiny_models import tiny_vlm
    return tiny_vlm("qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def vlm_qwen25():
    from tiny_models import tiny_vlm
    return tiny_vlm("qwen2_5_vl", seed=1)
