import keras
import pytest


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: PyTorch's intra-op thread
    pool costs far more than it gains on such small tensors."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
