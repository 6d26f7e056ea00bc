"""HOPE's Continuum Memory System (memory ``cms``): levels update exactly at their frequencies,
batched streams equal looped ones, the state survives a bytes round trip. Float64."""

from __future__ import annotations

import pytest
import torch

from models import CMSConfig, ModelConfig, NeuralMemoryConfig, state_from_bytes, state_to_bytes
from models.base import StorePolicy
from models.cms import ContinuumMemory
from models.config import ConfigError
from tests.models.test_neural_memory import ATOL, D, assert_states_close, tokens


def make_cms(frequencies: tuple[int, ...] = (1, 3, 5), seed: int = 0) -> ContinuumMemory:
    config = ModelConfig(
        d_model=D,
        memory="cms",
        neural_memory=NeuralMemoryConfig(heads=2, dim_head=8),
        cms=CMSConfig(frequencies=frequencies),
    )
    torch.manual_seed(seed)
    return ContinuumMemory(config).double()


def test_levels_update_exactly_at_their_frequencies() -> None:
    cms = make_cms((1, 3, 5))
    x = tokens(1, 16)
    state = cms.init_state(1)
    changed: dict[str, list[int]] = {name: [] for name in cms.levels}
    with torch.no_grad():
        for t in range(16):  # online: a growing window whose newest token is stored
            _, nxt = cms(x[:, max(0, t - 3) : t + 1], state, StorePolicy.LAST)
            for name in cms.levels:
                if not torch.equal(nxt[name, "weights", "w0"], state[name, "weights", "w0"]):
                    changed[name].append(t + 1)  # tokens stored so far
            state = nxt
    assert changed == {
        "level0": list(range(1, 17)),
        "level1": [3, 6, 9, 12, 15],
        "level2": [5, 10, 15],
    }


@pytest.mark.parametrize("policy", [StorePolicy.WINDOW, StorePolicy.LAST])
def test_batched_equals_looped(policy: StorePolicy) -> None:
    cms = make_cms()
    # streams at different positions: each level's buffer and phase differ between them
    states = []
    with torch.no_grad():
        for i in range(3):
            _, s = cms(tokens(1, 2 + 3 * i, seed=10 + i), cms.init_state(1), StorePolicy.WINDOW)
            states.append(s)
        x = tokens(3, 4)
        out, state = cms(x, torch.cat(states), policy)
        for i in range(3):
            out_i, state_i = cms(x[i : i + 1], states[i], policy)
            torch.testing.assert_close(out[i : i + 1], out_i, atol=ATOL, rtol=0)
            assert_states_close(state[i : i + 1], state_i)


def test_state_bytes_round_trip() -> None:
    cms = make_cms()
    with torch.no_grad():
        _, state = cms(tokens(2, 7), cms.init_state(2), StorePolicy.WINDOW)
        restored, _ = state_from_bytes(state_to_bytes(state, "fp"), "fp")
        assert_states_close(restored, state, atol=0)
        query = tokens(2, 4, seed=3)
        assert torch.equal(cms(query, restored, StorePolicy.NONE)[0], cms(query, state, StorePolicy.NONE)[0])


def test_cms_config_round_trip_and_checks() -> None:
    config = ModelConfig(memory="cms", cms=CMSConfig(frequencies=(1, 8)))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="cms.frequencies"):
        ModelConfig(memory="cms", cms=CMSConfig(frequencies=()))
    with pytest.raises(ConfigError, match="chunk_size >= 2"):  # an attention level updated every token
        make_cms_attention = ModelConfig(
            d_model=D, memory="cms", neural_memory=NeuralMemoryConfig(model="attention", chunk_size=2)
        )
        ContinuumMemory(make_cms_attention)
