import pytest
import torch

from a3lm.model.debug import FAMILIES, tiny_a3_model, tiny_base_model

torch.set_num_threads(2)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def a3_model(family):
    return tiny_a3_model(family)


@pytest.fixture
def base_and_a3(family):
    base = tiny_base_model(family)
    from a3lm import A3ForCausalLM

    return base, A3ForCausalLM.from_base(base).eval()
