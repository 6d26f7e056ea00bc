"""models.combination: batched = looped (float64), the documented regret bound with a control
that violates it, recovery after a switch of the best expert, and delayed (matured) losses."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from models import combination as comb
from models.combination import CombinationConfig

E, H, C = 3, 3, 2


def _forecasts(steps: int, best: int, seed: int = 0, b: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``[b, T, C]`` and expert forecasts ``[b, T, E, H, C]`` of every value window:
    expert ``best`` errs by at most 0.1, the others by a bias of 0.6-0.8 (bounded errors)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, steps + H, C, generator=g, dtype=torch.float64)
    truth = values.unfold(1, H, 1)[:, 1 : steps + 1].transpose(2, 3)  # [b, T, H, C]: rows t+1..t+H
    noise = 0.1 * (2 * torch.rand(b, steps, E, H, C, generator=g, dtype=torch.float64) - 1)
    bias = torch.full((E,), 0.7, dtype=torch.float64)
    bias[best] = 0.0
    return values, truth[:, :, None] + bias[:, None, None] + noise


def _replay(values: torch.Tensor, forecasts: torch.Tensor, cfg: CombinationConfig) -> torch.Tensor:
    """Step t: learn from value ``t`` (matured losses), then combine the forecasts made after it
    (for values ``t+1 .. t+H``)."""
    b, steps = forecasts.shape[:2]
    state = comb.init_state(b, H, E, C, dtype=torch.float64)
    out = []
    for t in range(steps):
        state = comb.observe(state, values[:, t], cfg)
        combined, state = comb.combine(state, forecasts[:, t])
        out.append(combined)
    return torch.stack(out, dim=1)  # [b, T, H, C]


def _cumulative_loss(forecasts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per horizon step, the summed squared error (mean over channels) ``[..., H]``."""
    steps = forecasts.shape[1]
    truth = values.unfold(1, H, 1)[:, 1 : steps + 1].transpose(2, 3)  # [b, T, H, C]
    if forecasts.dim() == 5:
        truth = truth[:, :, None]
    return (forecasts - truth).pow(2).mean(dim=-1).sum(dim=1)


def test_batched_equals_looped() -> None:
    cfg = CombinationConfig()
    values, forecasts = _forecasts(60, best=1, b=4)
    forecasts[2] = forecasts[2].flip(1)  # streams differ: another expert is best on stream 2
    batched = _replay(values, forecasts, cfg)
    looped = torch.cat([_replay(values[i : i + 1], forecasts[i : i + 1], cfg) for i in range(4)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_masked_streams_are_left_unchanged() -> None:
    cfg = CombinationConfig(normalise=False)
    state = comb.init_state(2, H, E, C, dtype=torch.float64)
    losses = torch.rand(2, H, E, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = comb.update(state, losses, cfg, mask)
    torch.testing.assert_close(out["log_weights"][1], state["log_weights"][1], rtol=0, atol=0)
    torch.testing.assert_close(out["log_weights"][0, 1], state["log_weights"][0, 1], rtol=0, atol=0)
    assert not torch.equal(out["log_weights"][0, 0], state["log_weights"][0, 0])


def test_cumulative_loss_within_the_regret_bound_of_the_best_expert() -> None:
    """Losses bounded by B (errors <= 1), eta tuned for T: the combination's excess over the
    always-best expert stays under the documented bound at every horizon step (delay h)."""
    steps, bound_b = 1500, 1.0
    cfg = CombinationConfig(eta=0.05, share=1e-3, normalise=False, clip=bound_b)
    values, forecasts = _forecasts(steps, best=2)
    combined = _cumulative_loss(_replay(values, forecasts, cfg), values)[0]  # [H]
    best = _cumulative_loss(forecasts[:, :, 2], values)[0]
    assert bool((forecasts - forecasts[:, :, 2:3]).abs().max() <= 1.0)  # losses within [0, B]
    for h in range(H):
        bound = comb.regret_bound(steps, E, cfg, bound_b, delay=h)
        assert combined[h] - best[h] <= bound, (h, float(combined[h] - best[h]), bound)
        assert combined[h] <= 1.5 * best[h] + 0.02 * steps  # and much tighter in practice
    # the control: equal weights (no learning) break the same bound, so the check can fail
    uniform = _cumulative_loss(forecasts.mean(dim=2), values)[0]
    assert bool((uniform - best > comb.regret_bound(steps, E, cfg, bound_b, delay=H - 1)).all())


def test_weights_recover_after_the_best_expert_changes() -> None:
    """Fixed share keeps a losing expert's weight from vanishing: after a regime switch the
    new best expert takes over within tens of rounds at the default eta (plain Hedge needs
    hundreds)."""
    v1, f1 = _forecasts(400, best=0, seed=1)
    v2, f2 = _forecasts(400, best=1, seed=2)
    values, forecasts = torch.cat([v1[:, :400], v2], dim=1), torch.cat([f1, f2], dim=1)

    def weight_of_new_best(cfg: CombinationConfig) -> torch.Tensor:
        state = comb.init_state(1, H, E, C, dtype=torch.float64)
        for t in range(400 + 80):
            state = comb.observe(state, values[:, t], cfg)
            _, state = comb.combine(state, forecasts[:, t])
        return comb.weights(state)[0, :, 1]  # [H]

    assert bool((weight_of_new_best(CombinationConfig()) > 0.9).all())
    assert bool((weight_of_new_best(CombinationConfig(share=0.0)) < 0.5).all())  # the control


def test_a_loss_is_learned_only_once_its_value_is_observed() -> None:
    """Horizon step h learns first from the value h + 1 observations after the first forecast."""
    cfg = CombinationConfig()
    state = comb.init_state(1, H, E, C, dtype=torch.float64)
    forecasts = torch.zeros(1, E, H, C, dtype=torch.float64)
    forecasts[:, 0] = 5.0  # expert 0 is far off at every step
    uniform = state["log_weights"].clone()
    _, state = comb.combine(state, forecasts)
    for k in range(H):
        state = comb.observe(state, torch.zeros(1, C, dtype=torch.float64), cfg)
        lw = state["log_weights"][0]
        assert bool((lw[: k + 1, 0] < uniform[0, : k + 1, 0]).all())  # matured steps learned
        torch.testing.assert_close(lw[k + 1 :], uniform[0, k + 1 :], rtol=0, atol=0)  # not yet
        _, state = comb.combine(state, torch.zeros(1, E, H, C, dtype=torch.float64))


def test_state_is_a_value() -> None:
    state = comb.init_state(2, H, E, C)
    before = TensorDict({k: v.clone() for k, v in state.items()}, batch_size=[2])
    _, nxt = comb.combine(state, torch.ones(2, E, H, C))
    comb.observe(nxt, torch.ones(2, C), CombinationConfig())
    for k in state.keys():
        assert torch.equal(state[k], before[k])
