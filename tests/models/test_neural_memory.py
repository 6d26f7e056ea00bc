"""NeuralMemory and TitansBackbone: learning, equivalences (batched = looped, chunked = whole),
statelessness of the module, gradient flow. Everything in float64 with tight tolerances."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from models.base import StorePolicy
from models.config import ConfigError, ModelConfig, NeuralMemoryConfig
from models.neural_memory import (
    MLPMemory,
    NeuralMemory,
    _build_chunk_grads,
    clip_surprise,
    momentum_decay_scan,
)
from models.titans_backbone import TitansBackbone

D = 16
ATOL = 1e-9


def make_memory(seed: int = 0, **memory: object) -> NeuralMemory:
    settings = {"heads": 2, "dim_head": 8, **memory}
    config = ModelConfig(d_model=D, neural_memory=NeuralMemoryConfig(**settings))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return NeuralMemory(config).double()


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_states_close(a: TensorDict, b: TensorDict, atol: float = ATOL) -> None:
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"state entry {key}")


def store(memory: NeuralMemory, x: torch.Tensor, state: TensorDict, splits: list[int]) -> TensorDict:
    """Stores the tokens of ``x`` in consecutive calls of the given lengths."""
    start = 0
    for size in splits:
        _, state = memory(x[:, start : start + size], state, StorePolicy.WINDOW)
        start += size
    assert start == x.shape[1]
    return state


def test_store_reduces_retrieval_error() -> None:
    memory = make_memory(max_lr=1.0)
    x = tokens(2, 6)
    state = memory.init_state(2)
    with torch.no_grad():
        before = memory.surprise(x, state).mean()
        for _ in range(4):
            _, state = memory(x, state, StorePolicy.WINDOW)
        after = memory.surprise(x, state).mean()
    assert after < 0.7 * before


def test_zero_learning_rate_keeps_weights() -> None:
    memory = make_memory(max_lr=0.0, chunk_size=2)
    with torch.no_grad():
        memory.to_decay.bias.fill_(-1e4)  # alpha = 0: no forgetting either
    state = memory.init_state(2)
    _, after = memory(tokens(2, 5), state, StorePolicy.WINDOW)
    _, after = memory(tokens(2, 5, seed=2), after, StorePolicy.LAST)
    for part in ("weights", "pending"):
        for name, w in state[part].items():
            assert torch.equal(after[part][name], w), f"{part}.{name} changed"
    assert all(torch.equal(m, torch.zeros_like(m)) for m in after["momentum"].values())
    assert after["seq_index"].tolist() == [6, 6]


def test_scan_equals_step_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    s, steps, shape = 3, 7, (4, 5)
    eta, alpha = torch.rand(s, steps, generator=gen), torch.rand(s, steps, generator=gen)
    eta[0, 2], alpha[1, 3], alpha[2, 0] = 0.0, 1.0, 0.0  # gates at their ends
    update = torch.randn(s, steps, *shape, generator=gen, dtype=torch.float64)
    momentum0 = torch.randn(s, *shape, generator=gen, dtype=torch.float64)
    weights0 = torch.randn(s, *shape, generator=gen, dtype=torch.float64)
    eta, alpha = eta.double(), alpha.double()
    s_all, m_all = momentum_decay_scan(eta, alpha, update, momentum0, weights0)
    momentum, weights = momentum0, weights0
    for j in range(steps):
        momentum = eta[:, j, None, None] * momentum + update[:, j]
        weights = (1 - alpha[:, j, None, None]) * weights + momentum
        torch.testing.assert_close(s_all[:, j], momentum, atol=1e-12, rtol=0)
        torch.testing.assert_close(m_all[:, j], weights, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["mlp", "simple", "advanced"])
@pytest.mark.parametrize("model", ["mlp", "attention"])
@pytest.mark.parametrize("policy", [StorePolicy.WINDOW, StorePolicy.LAST])
def test_batched_equals_looped(model: str, policy: StorePolicy, variant: str) -> None:
    memory = make_memory(model=model, chunk_size=2, batch_size=4, variant=variant)
    x = tokens(3, 5)
    # streams at different positions: buffers and commit phases differ between them
    states = [store(memory, tokens(1, i + 2, seed=10 + i), memory.init_state(1), [i + 2]) for i in range(3)]
    out, state = memory(x, torch.cat(states), policy)
    for i in range(3):
        out_i, state_i = memory(x[i : i + 1], states[i], policy)
        torch.testing.assert_close(out[i : i + 1], out_i, atol=ATOL, rtol=0)
        assert_states_close(state[i : i + 1], state_i)


@pytest.mark.parametrize(
    ("model", "chunk_size", "batch_size"),
    [("mlp", 1, None), ("mlp", 4, None), ("mlp", 2, 6), ("attention", 4, 8)],
)
def test_chunking_invariance(model: str, chunk_size: int, batch_size: int | None) -> None:
    memory = make_memory(model=model, chunk_size=chunk_size, batch_size=batch_size)
    x = tokens(1, 12)
    whole = store(memory, x, memory.init_state(1), [12])
    for splits in ([1] * 12, [5, 3, 4], [3, 9]):
        assert_states_close(store(memory, x, memory.init_state(1), splits), whole)
    online = memory.init_state(1)
    for t in range(12):  # the online path: a growing window, learning its newest token
        _, online = memory(x[:, max(0, t - 3) : t + 1], online, StorePolicy.LAST)
    assert_states_close(online, whole)
    query = tokens(1, 4, seed=5)
    out_whole, _ = memory(query, whole, StorePolicy.NONE)
    out_online, _ = memory(query, online, StorePolicy.NONE)
    torch.testing.assert_close(out_online, out_whole, atol=ATOL, rtol=0)
    assert whole["seq_index"].item() == 12 and whole["buffer", "count"].item() == 12 % chunk_size


def test_forward_keeps_module_unchanged_and_learns_projections() -> None:
    memory = make_memory(chunk_size=2)

    def attributes() -> dict[str, dict[str, int]]:
        return {name: {k: id(v) for k, v in vars(m).items()} for name, m in memory.named_modules()}

    before = attributes()
    params = {k: v.detach().clone() for k, v in memory.state_dict().items()}
    out, state = memory(tokens(2, 6), memory.init_state(2), StorePolicy.WINDOW)
    assert attributes() == before
    assert list(memory.buffers()) == []
    assert all(torch.equal(v, params[k]) for k, v in memory.state_dict().items())
    out.pow(2).sum().backward()
    for name in ("to_k", "to_v", "to_lr", "to_momentum", "to_decay"):
        weight = getattr(memory, name).weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in memory.memory_model.parameters())


def test_none_policy_and_bad_batch_size() -> None:
    memory = make_memory(chunk_size=2)
    state = memory.init_state(1)
    _, same = memory(tokens(1, 3), state, StorePolicy.NONE)
    assert same is state
    with pytest.raises(ConfigError, match="multiple of chunk_size"):
        make_memory(chunk_size=2, batch_size=3)


def titans_config(fusion: str, memory: str = "titans") -> ModelConfig:
    return ModelConfig(
        seq_len=6,
        d_model=D,
        n_heads=2,
        n_layers=2,
        backbone="titans",
        memory=memory,
        fusion=fusion,
        neural_memory=NeuralMemoryConfig(heads=2, dim_head=8, chunk_size=2),
    )


@pytest.mark.parametrize("fusion", ["layer", "context", "gated"])
def test_titans_backbone_batched_equals_looped(fusion: str) -> None:
    torch.manual_seed(0)
    backbone = TitansBackbone(titans_config(fusion)).double()
    state = backbone.init_state(3)
    assert set(state.keys()) == {"layer0", "layer1"}
    _, state = backbone(tokens(3, 6), state, StorePolicy.WINDOW)
    state = torch.cat([state[:2], backbone(tokens(1, 6, seed=4), state[2:], StorePolicy.LAST)[1]])
    x = tokens(3, 6, seed=7)
    out, next_state = backbone(x, state, StorePolicy.LAST)
    assert out.shape == (3, 6, D) and set(next_state.keys()) == {"layer0", "layer1"}
    for i in range(3):
        out_i, state_i = backbone(x[i : i + 1], state[i : i + 1], StorePolicy.LAST)
        torch.testing.assert_close(out[i : i + 1], out_i, atol=ATOL, rtol=0)
        assert_states_close(next_state[i : i + 1], state_i)
    assert not torch.equal(next_state["layer1", "weights", "w0"], state["layer1", "weights", "w0"])


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_titans_backbone_refuses_fusions_it_does_not_have(fusion: str) -> None:
    """add and concat used to be silent aliases of gated and context; the config now says so."""
    with pytest.raises(ConfigError, match=f"fusion '{fusion}' does not work with backbone 'titans'"):
        titans_config(fusion)


def test_titans_backbone_without_memory_is_plain_transformer() -> None:
    backbone = TitansBackbone(titans_config("layer", memory="none")).double()
    state = backbone.init_state(2)
    assert list(state.keys()) == []
    out, next_state = backbone(tokens(2, 6), state, StorePolicy.LAST)
    assert out.shape == (2, 6, D) and list(next_state.keys()) == []
    causal, _ = backbone(tokens(2, 6)[:, :4], state, StorePolicy.NONE)
    assert causal.shape == (2, 4, D)


def halves_memory(**memory: object) -> tuple[NeuralMemory, int]:
    """A memory whose keys are the first half of each token and values the second half (the
    projections select them), so what it must store is independent of what it is asked."""
    cfg = NeuralMemoryConfig(**memory)  # type: ignore[arg-type]
    inner = cfg.heads * cfg.dim_head
    torch.manual_seed(0)
    memory_unit = NeuralMemory(ModelConfig(d_model=2 * inner, neural_memory=cfg)).double()
    eye, zero = torch.eye(inner, dtype=torch.float64), torch.zeros(inner, inner, dtype=torch.float64)
    with torch.no_grad():
        memory_unit.to_k.weight.copy_(torch.cat([eye, zero], dim=1))
        memory_unit.to_v.weight.copy_(torch.cat([zero, eye], dim=1))
    return memory_unit, 2 * inner


def prequential_errors(
    memory: NeuralMemory, x: torch.Tensor, state: TensorDict
) -> tuple[torch.Tensor, TensorDict]:
    """Retrieval error of each token before it is stored, storing one token per call (online)."""
    errors = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            errors.append(memory.surprise(x[:, t : t + 1], state)[:, 0])
            _, state = memory(x[:, t : t + 1], state, StorePolicy.LAST)
    return torch.stack(errors, dim=1), state


def test_default_memory_memorises_a_repeated_pattern() -> None:
    """Issue 9, M1: with unit-length keys and theta <= 0.1 the old default learned nothing from
    32 repetitions (period 32 / period 1 = 0.97)."""
    memory, d = halves_memory()
    pattern = torch.randn(1, 8, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors, _ = prequential_errors(memory, pattern.repeat(1, 32, 1), memory.init_state(1))
    per_period = errors.view(32, 8).mean(dim=1)
    assert per_period[-1] <= 0.2 * per_period[0], per_period.tolist()


def test_forgetting_returns_to_the_pretrained_memory() -> None:
    """Issue 9, M2: decay acted on the absolute weights, which reached exactly 0 (a saddle of
    the MLP memory) after some thousand tokens; it must act on the learned change only."""
    memory, d = halves_memory()
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randn(1, 8, d, dtype=torch.float64, generator=gen)
    noise = torch.randn(1, 4000, d, dtype=torch.float64, generator=gen)
    fresh = memory.init_state(1)
    with torch.no_grad():
        stored = store(memory, pattern.repeat(1, 8, 1), fresh, [64])
        after_512 = store(memory, noise[:, :512], stored, [512])
        after_4000 = store(memory, noise[:, 512:], after_512, [3488])
        known, forgotten = (memory.surprise(pattern, s).mean() for s in (stored, after_512))
        assert forgotten > 5 * known  # the pattern's error rose again
        probe = torch.randn(1, 16, d, dtype=torch.float64, generator=gen)
        pretrained_read, _ = memory(probe, fresh, StorePolicy.NONE)
        late_read, _ = memory(probe, after_4000, StorePolicy.NONE)
    # the memory still answers (zero weights answer exactly zero) ...
    assert late_read.norm() > 0.5 * pretrained_read.norm()
    # and its weights stay in a bounded region around the pretrained ones: the learned change is
    # stationary (no drift between token 512 and 4,000) and the weights do not shrink to zero
    pretrained = dict(memory.memory_model.named_parameters())
    mid, late = memory.memory_weights(after_512), memory.memory_weights(after_4000)
    for name, w0 in pretrained.items():
        change = (late[name][0] - w0).norm()
        assert change < 2 * w0.norm() and change < 1.5 * (mid[name][0] - w0).norm(), name
        assert late[name].norm() > 0.5 * w0.norm(), name


def test_attention_memory_learns_its_attention_or_is_refused() -> None:
    """Issue 9, M4: with one token per chunk the softmax over that token is 1, so wq/wk got
    exactly zero gradient; that combination is refused, and chunks of 2 learn wq and wk."""
    with pytest.raises(ConfigError, match="chunk_size >= 2"):
        make_memory(model="attention", chunk_size=1)
    memory = make_memory(model="attention", chunk_size=2)
    with torch.no_grad():
        _, state = memory(tokens(2, 6), memory.init_state(2), StorePolicy.WINDOW)
    fresh = memory.init_state(2)
    for name in ("wq", "wk", "wv", "wo"):  # every stream's inner loop changed every weight
        changed = (state["weights", name] - fresh["weights", name]).flatten(1).abs().sum(1)
        assert bool((changed > 0).all()), name


def test_memory_variants_keep_their_gates() -> None:
    """``mlp``: no momentum, no forgetting, queries = keys; ``simple``: per-head constant gates;
    ``advanced``: its own query projection and per-token gates."""
    x = tokens(1, 6)
    mlp, simple, advanced = (make_memory(variant=v) for v in ("mlp", "simple", "advanced"))
    assert mlp.to_q is None and simple.to_q is None and advanced.to_q is not None
    with torch.no_grad():
        _, state = mlp(x, mlp.init_state(1), StorePolicy.WINDOW)
        assert any(bool((w != 0).any()) for w in state["weights"].values())
        mlp.to_momentum.bias.fill_(5.0)  # the momentum and forgetting gates play no part
        mlp.to_decay.bias.fill_(5.0)
        _, same = mlp(x, mlp.init_state(1), StorePolicy.WINDOW)
    assert_states_close(same, state, atol=0)
    with torch.no_grad():
        gates = {v: m._token_inputs(x) for v, m in (("simple", simple), ("advanced", advanced))}
    for field in ("lr", "momentum", "decay"):
        constant = gates["simple"][field]
        assert torch.equal(constant, constant[:, :, :1].expand_as(constant)), field
        assert not torch.allclose(gates["advanced"][field], gates["advanced"][field][:, :, :1]), field
    with pytest.raises(ConfigError, match="neural_memory.variant"):
        make_memory(variant="fancy")


def test_a_chunk_steps_by_the_mean_of_its_tokens() -> None:
    """A chunk of t copies of a token moves the memory exactly as one copy does; summing the
    chunk's gradients made a slow CMS level (256 tokens per step) diverge to NaN online."""
    x = tokens(1, 1)
    one = make_memory(chunk_size=1)
    eight = make_memory(chunk_size=8)
    with torch.no_grad():
        _, a = one(x, one.init_state(1), StorePolicy.WINDOW)
        _, b = eight(x.repeat(1, 8, 1), eight.init_state(1), StorePolicy.WINDOW)
    for part in ("weights", "momentum"):
        for name, w in a[part].items():
            torch.testing.assert_close(b[part][name], w, atol=ATOL, rtol=0, msg=f"{part}.{name}")


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_chunk_grads_written_out_equal_torch_func_to_second_order(depth: int) -> None:
    """MLPMemory.chunk_grads (the chain rule by hand, the store's hot path) against the
    generic torch.func gradient, and pretraining's gradient through it."""
    torch.manual_seed(depth)
    s, c, t, e, hidden = 6, 3, 4, 8, 16
    dims = [e] + [hidden] * (depth - 1) + [e]
    params = {
        f"w{i}": torch.randn(s, a, b, dtype=torch.float64, requires_grad=True)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }
    keys = torch.randn(s, c, t, e, dtype=torch.float64, requires_grad=True)
    values, lr = torch.randn(s, c, t, e, dtype=torch.float64), torch.rand(s, c, t, dtype=torch.float64)
    generic = _build_chunk_grads(MLPMemory.memory_fn)(params, keys, values, lr)
    written = MLPMemory.chunk_grads(params, keys, values, lr)
    assert written.keys() == generic.keys()
    for name, g in generic.items():
        torch.testing.assert_close(written[name], g, rtol=1e-12, atol=1e-12)
    inputs = [*params.values(), keys]
    outer_generic = torch.autograd.grad(sum((g * g).sum() for g in generic.values()), inputs)
    outer_written = torch.autograd.grad(sum((g * g).sum() for g in written.values()), inputs)
    for a, b in zip(outer_written, outer_generic, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- surprise clipping


def unstable_memory(max_grad_norm: float) -> NeuralMemory:
    """Gates at their limits: theta ~ 1 and momentum eta ~ 0.98 for every token, the regime in
    which a default memory diverged on ETTh1-M (see ``clip_surprise``)."""
    memory = make_memory(max_grad_norm=max_grad_norm)
    with torch.no_grad():
        for gate, logit in ((memory.to_lr, 10.0), (memory.to_momentum, 4.0)):
            gate.weight.zero_()
            gate.bias.fill_(logit)
    return memory


@pytest.mark.parametrize("max_grad_norm", [0.0, 10.0])
def test_clipped_surprise_keeps_an_unstable_memory_finite(max_grad_norm: float) -> None:
    """Without clipping (the control) the weights overflow within 300 tokens; clipped, every
    weight and read stays finite."""
    memory = unstable_memory(max_grad_norm)
    x = tokens(1, 300)
    state = memory.init_state(1)
    with torch.no_grad():
        for t in range(x.shape[1]):
            read, state = memory(x[:, t : t + 1], state, StorePolicy.WINDOW)
    finite = all(bool(torch.isfinite(w).all()) for w in state["weights"].values())
    finite = finite and bool(torch.isfinite(read).all())
    assert finite == (max_grad_norm > 0)


def test_clip_surprise_scales_only_the_rows_above_the_bound() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = {
        "w0": torch.randn(4, 3, 8, 16, dtype=torch.float64, generator=gen),
        "w1": torch.randn(4, 3, 16, 8, dtype=torch.float64, generator=gen),
    }
    grads = {
        k: g * torch.tensor([0.01, 1.0, 0.02, 3.0], dtype=torch.float64).view(4, 1, 1, 1)
        for k, g in grads.items()
    }
    norms = torch.sqrt(sum(g.flatten(2).square().sum(-1) for g in grads.values()))  # [4, 3]
    bound = 1.0
    assert bool((norms[[0, 2]] < bound).all()) and bool((norms[[1, 3]] > bound).all())
    clipped = clip_surprise(grads, bound, lead=2)
    after = torch.sqrt(sum(g.flatten(2).square().sum(-1) for g in clipped.values()))
    for k in grads:  # below the bound: the very same numbers
        assert torch.equal(clipped[k][[0, 2]], grads[k][[0, 2]])
    torch.testing.assert_close(after[[1, 3]], torch.full((2, 3), bound, dtype=torch.float64))
    for k in grads:  # each row only rescaled, in its own direction
        ratio = clipped[k][[1, 3]] / grads[k][[1, 3]]
        torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio))
    assert clip_surprise(grads, 0.0, lead=2) is grads


def test_negative_surprise_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_grad_norm"):
        make_memory(max_grad_norm=-1.0)
