"""Shared test settings: deterministic seeds, two threads (the CI machine's cores), offline wandb."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
