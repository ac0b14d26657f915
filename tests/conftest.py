import pytest
import torch

from a3lm.model.debug import CORE_FAMILIES, FAMILIES, tiny_a3_model, tiny_base_model

torch.set_num_threads(2)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Every supported family: the invariance tests (content == base, references, cache, save/load)."""
    return request.param


@pytest.fixture(params=CORE_FAMILIES)
def core_family(request) -> str:
    """One family per kind of trap, for the costlier tests (enumerations, training paths)."""
    return request.param


@pytest.fixture
def a3_model(family):
    return tiny_a3_model(family)


@pytest.fixture
def core_a3_model(core_family):
    return tiny_a3_model(core_family)


@pytest.fixture
def base_and_a3(family):
    base = tiny_base_model(family)
    from a3lm import A3ForCausalLM

    return base, A3ForCausalLM.from_base(base).eval()
