import os

# Tests never reach for a hub: everything is built in code or read from the repository.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One thread per process, here and in the CLIs the tests start (they inherit the environment): the tiny models'
# matrices are too small for a second thread to pay for its synchronisation, and on a shared 2-core machine an
# OpenMP thread waiting for its time slice made every operation wait with it (10 budget chunks: 1.2 s on one
# thread, 24 s on two at a load of 10). A developer's own OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from emloc.tiny import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def model(request, tokenizer):
    """Each supported family, random weights sharp enough that pruning moves the output."""
    return FAMILIES[request.param](tokenizer, init_std=0.15, seed=1)


@pytest.fixture(scope="session")
def qwen2_vl(tokenizer):
    return tiny_qwen2_vl(tokenizer, init_std=0.15, seed=1)
