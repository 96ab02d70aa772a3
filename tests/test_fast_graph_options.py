"""FastOptions refuses, before any capture, the CUDA-graph combinations that cannot be captured.
resolved() reads only the device type, so the CUDA rules are checked on a CPU machine."""

import pytest
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.fast import FastOptions

CUDA = torch.device("cuda")


def test_non_fused_adam_is_refused_with_the_cuda_graph():
    with pytest.raises(FastFVAEError, match="fused_adam=False needs cuda_graph=False"):
        FastOptions(fused_adam=False).resolved(CUDA)  # cuda_graph defaults to on for CUDA
    with pytest.raises(FastFVAEError, match="fused_adam=False"):
        FastOptions(fused_adam=False, cuda_graph=True).resolved(CUDA)


def test_non_fused_adam_without_the_graph_is_accepted():
    resolved = FastOptions(fused_adam=False, cuda_graph=False).resolved(CUDA)
    assert resolved.cuda_graph is False and resolved.fused_adam is False
    assert FastOptions().resolved(CUDA).cuda_graph is True
    assert FastOptions(fused_adam=False).resolved(torch.device("cpu")).cuda_graph is False
