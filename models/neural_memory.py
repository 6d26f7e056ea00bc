"""Titans neural memory: a small network whose weights are learned at test time, per stream.

Behrouz, Zhong, Mirrokni (2025), "Titans: Learning to Memorize at Test Time", section 3.
The module holds only shared parameters (projections, gates, norms and the learned *initial*
weights of the inner memory network); the weights each stream has learned live in its state.

Axis legend: ``b`` streams, ``n`` time, ``d`` features, ``h`` heads, ``e`` features per head,
``s`` stream-heads (``b*h``), ``c`` chunks of one store call, ``t`` tokens of one chunk.

How tokens are learned from:

* ``chunk_size`` tokens share one gradient step: their losses, each weighted by its own
  learning rate theta, are averaged (summing made a chunk of 256 diverge); momentum and forgetting gates use the chunk's mean.
  Tokens that do not fill a chunk wait in the state's ``buffer`` until it is full.
* ``batch_size`` tokens (a multiple of ``chunk_size``; default ``chunk_size``) take their
  gradients w.r.t. the same *committed* weights, the paper's mini-batch form (section 3.2:
  gradients at ``M_{t'}``, ``t' = t - t mod batch_size``). The surprise and forgetting
  recurrences over the chunks of a batch run as an associative scan; at the end of a batch the
  latest (``pending``) weights are committed. Retrieval reads the committed weights.
* Chunk and batch boundaries count from a stream's first stored token, so how a stream's
  tokens are split across calls, or which streams share a call, never changes the result.

Choices that make one exposure count, and forgetting safe (issue 9; compared with the paper
and titans-pytorch 0.0.20):

* Keys and queries are rescaled to RMS 1 (``|k|^2 = e``), as the reference's q/k RMSNorm does;
  unit-length keys made one step correct at most ~1.25% of the error.
* theta maps the gate exponentially into ``[min_lr, max_lr]`` (default ``[1e-3, 1]``), starting
  at ``INIT_LR``; the old linear map of a sigmoid capped it at 0.1.
* The state holds the stream's learned *change* from the pretrained weights, and forgetting
  (eq 13) decays that change, as the reference does: the memory forgets back to its pretrained
  weights instead of to zero, a saddle of the MLP memory it never left.
* The attention memory needs ``chunk_size >= 2`` (config check): one token per chunk attends to
  itself only, which gives its ``wq``/``wk`` zero gradient.

Variants (``neural_memory.variant``): ``advanced`` is all of the above, with separate query,
key and value projections and data-dependent (per-token) theta, eta and alpha; ``simple`` has
queries = keys and learned per-head *constant* gates (momentum and forgetting kept); ``mlp``
is a plain MLP memory: queries = keys, a per-head constant theta, no momentum, no forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn
from torch.func import grad

from models.base import MemoryUnit, StatePath, StorePolicy, replaced, tree, where_rows
from models.config import ConfigError, ModelConfig, NeuralMemoryConfig

Params = dict[str, Tensor]
MemoryFn = Callable[[Params, Tensor], Tensor]

INIT_LR = 0.1  # learning rate theta at initialisation (the gate's bias is set to give it)
INIT_DECAY_LOGIT = -5.0  # alpha = sigmoid(-5) = 0.7% of the learned change forgotten per token
ATTN_SCALE = 8.0  # logit scale of the attention memory (its queries and keys are unit vectors)
_TOKEN_FIELDS = ("keys", "values", "lr", "momentum", "decay")  # per-token inputs of a store


class MLPMemory(nn.Module):
    """Initial weights of an MLP memory, one set per head. ``memory_fn`` is pure in the weights
    and broadcasts over their leading dims, so streams whose weights differ run as one batch."""

    def __init__(self, heads: int, cfg: NeuralMemoryConfig) -> None:
        super().__init__()
        hidden = max(1, int(cfg.expansion * cfg.dim_head))
        dims = [cfg.dim_head] + [hidden] * (cfg.depth - 1) + [cfg.dim_head]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            weight = torch.randn(heads, d_in, d_out) / math.sqrt(d_in)
            self.register_parameter(f"w{i}", nn.Parameter(weight))

    @staticmethod
    def memory_fn(params: Params, x: Tensor) -> Tensor:
        """``x [*, t, e] -> [*, t, e]`` with weights ``w0 .. w{depth-1}`` of shape ``[*, i, o]``."""
        depth = len(params)
        for i in range(depth):
            x = _mm(x, params[f"w{i}"])
            if i < depth - 1:
                x = F.gelu(x)
        return x

    @staticmethod
    def chunk_grads(params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Params:
        """What :func:`_build_chunk_grads` computes for this memory, by the chain rule written
        out: storing a token is the memory's hottest path, and torch.func's transforms cost
        several times the few matmuls of a small MLP. Plain tensor operations, so pretraining
        still backpropagates through it (second order included). Shapes as there:
        ``params [s, *w]``, ``keys values [s, c, t, e]``, ``lr [s, c, t]`` -> ``[s, c, *w]``."""
        weights = [params[f"w{i}"].unsqueeze(1) for i in range(len(params))]  # [s, 1, i, o]
        return _mlp_grads(weights, keys, values, lr)

    @staticmethod
    def one_chunk_grads(params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Params:
        """:meth:`chunk_grads` of a single chunk: ``keys values [s, t, e]``, ``lr [s, t]`` ->
        ``[s, *w]``, the same numbers without the chunk dimension, whose broadcasting made each
        matrix product several operations (the online step stores one token at a time)."""
        return _mlp_grads([params[f"w{i}"] for i in range(len(params))], keys, values, lr)


def _mlp_grads(weights: list[Tensor], keys: Tensor, values: Tensor, lr: Tensor) -> Params:
    """The MLP memory's gradients of ``sum(lr * mean_e((M(k) - v)^2)) / t`` w.r.t. ``weights``
    (``[*, i, o]``, broadcast against the leading dims of ``keys values [*, t, e]``)."""
    depth = len(weights)
    inputs, pre = [keys], []
    x = keys
    for i, w in enumerate(weights):
        h = _mm(x, w)
        if i < depth - 1:
            pre.append(h)
            x = F.gelu(h)
            inputs.append(x)
        else:
            x = h
    # d/dy of sum(lr * mean_e((y - v)^2)) / t
    tokens = keys.shape[-1] * keys.shape[-2]
    if math.frexp(2.0 / tokens)[0] == 0.5:  # a power of two: lr times it is 2 lr / tokens exactly
        g = (x - values) * (lr[..., None] * (2.0 / tokens))
    else:
        g = (x - values) * (2.0 * lr / tokens)[..., None]
    grads: Params = {}
    for i in range(depth - 1, -1, -1):
        grads[f"w{i}"] = _mm(inputs[i].transpose(-1, -2), g)  # [*, i, o]
        if i:
            h = pre[i - 1]
            g = _mm(g, weights[i].transpose(-1, -2)) * _gelu_grad(h)
    return {f"w{i}": grads[f"w{i}"] for i in range(depth)}


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad(h: Tensor) -> Tensor:
    """The exact GELU's derivative at ``h``."""
    cdf = 0.5 * (1.0 + torch.erf(h * _SQRT_HALF))
    pdf = torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return cdf + h * pdf


class AttentionMemory(nn.Module):
    """Initial weights of an attention memory: causal softmax attention among the tokens it is
    given (a chunk when storing, the window when retrieving), weights ``wq wk wv wo [*, e, e]``."""

    def __init__(self, heads: int, cfg: NeuralMemoryConfig) -> None:
        super().__init__()
        e = cfg.dim_head
        for name in ("wq", "wk", "wv", "wo"):
            self.register_parameter(name, nn.Parameter(torch.randn(heads, e, e) / math.sqrt(e)))

    @staticmethod
    def memory_fn(params: Params, x: Tensor) -> Tensor:
        """``x [*, t, e] -> [*, t, e]``."""
        q = F.normalize(x @ params["wq"], dim=-1)
        k = F.normalize(x @ params["wk"], dim=-1)
        scores = ATTN_SCALE * q @ k.transpose(-1, -2)  # [*, t, t]
        t = x.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return attn @ (x @ params["wv"]) @ params["wo"]


MEMORY_MODEL_CLASSES: dict[str, type[MLPMemory] | type[AttentionMemory]] = {
    "mlp": MLPMemory,
    "attention": AttentionMemory,
}


def linear_scan(a: Tensor, u: Tensor, x0: Tensor) -> Tensor:
    """All ``x_j = a_j * x_{j-1} + u_j`` along dim 1, ``x_{-1} = x0``, by recursive doubling.

    ``a [s, L]``, ``u [s, L, *w]``, ``x0 [s, *w]`` -> ``[s, L, *w]``. Composing two steps is
    ``(a1, u1) then (a2, u2) = (a1 a2, a2 u1 + u2)``, which is associative, so log2(L) tensor
    ops cover L steps; unlike a log-space cumprod it stays exact when a gate is 0 or 1.
    """
    a = a.reshape(*a.shape, *([1] * (u.dim() - a.dim())))
    step = 1
    while step < u.shape[1]:
        u = torch.cat([u[:, :step], a[:, step:] * u[:, :-step] + u[:, step:]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return a * x0.unsqueeze(1) + u


def momentum_decay_scan(
    eta: Tensor, alpha: Tensor, update: Tensor, momentum: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Surprise with momentum and forgetting over L steps, for every step.

    ``S_j = eta_j S_{j-1} + update_j`` (eq 14, ``update = -theta * grad``) and
    ``M_j = (1 - alpha_j) M_{j-1} + S_j`` (eq 13). Gates ``[s, L]``, ``update [s, L, *w]``,
    initial ``momentum``/``weights [s, *w]`` -> (all S, all M), each ``[s, L, *w]``.
    """
    surprise = linear_scan(eta, update, momentum)
    return surprise, linear_scan(1 - alpha, surprise, weights)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Per-stream gather along time: ``t [b, h, T, *]``, ``idx [b, T'] -> [b, h, T', *]``."""
    index = idx.reshape(idx.shape[0], 1, idx.shape[1], *([1] * (t.dim() - 3)))
    return t.gather(2, index.expand(t.shape[0], t.shape[1], idx.shape[1], *t.shape[3:]))


def _at_step(start: Tensor, steps: Tensor, done: Tensor | None) -> Tensor:
    """Value after ``done [s]`` of the L scanned ``steps [s, L, *]`` (``start`` when 0, the
    last step when ``done`` is None)."""
    if done is None:
        return steps[:, -1]
    path = torch.cat([start.unsqueeze(1), steps], dim=1)
    return path[torch.arange(path.shape[0], device=path.device), done]


class NeuralMemory(MemoryUnit):
    """Titans long-term memory (section 3.1): learns ``k -> v`` associations of each stream by
    gradient descent with momentum and forgetting, then answers queries from every token."""

    def __init__(self, config: ModelConfig, dim: int | None = None) -> None:
        super().__init__()
        cfg = config.neural_memory
        batch_size = cfg.batch_size or cfg.chunk_size
        if cfg.chunk_size < 1 or batch_size % cfg.chunk_size:
            raise ConfigError("neural_memory.batch_size must be a multiple of chunk_size >= 1")
        if cfg.depth < 1 or cfg.heads < 1 or cfg.dim_head < 1:
            raise ConfigError("neural_memory.depth, heads and dim_head must be >= 1")
        if cfg.max_grad_norm < 0:
            raise ConfigError(
                f"neural_memory.max_grad_norm={cfg.max_grad_norm} must be >= 0 (0: no clipping)"
            )
        self.dim = dim or config.d_model
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.chunk_size, self.chunks_per_batch = cfg.chunk_size, batch_size // cfg.chunk_size
        self.min_lr, self.max_lr = cfg.min_lr, cfg.max_lr
        self.max_grad_norm = cfg.max_grad_norm
        self.variant = cfg.variant
        inner = cfg.heads * cfg.dim_head
        self.store_norm = nn.RMSNorm(self.dim)
        self.retrieve_norm = nn.RMSNorm(self.dim)
        # "mlp"/"simple" query with the key projection
        self.to_q = nn.Linear(self.dim, inner, bias=False) if cfg.variant == "advanced" else None
        self.to_k = nn.Linear(self.dim, inner, bias=False)
        self.to_v = nn.Linear(self.dim, inner, bias=False)
        self.to_lr = nn.Linear(self.dim, cfg.heads)  # theta_t, per token and head
        self.to_momentum = nn.Linear(self.dim, cfg.heads)  # eta_t, per chunk and head
        self.to_decay = nn.Linear(self.dim, cfg.heads)  # alpha_t, per chunk and head
        nn.init.constant_(self.to_lr.bias, _lr_logit(INIT_LR, cfg.min_lr, cfg.max_lr))
        nn.init.constant_(self.to_decay.bias, INIT_DECAY_LOGIT)  # start by forgetting little
        self.out_norm = nn.RMSNorm(cfg.dim_head)
        self.to_out = nn.Linear(inner, self.dim, bias=False)
        self.memory_model = MEMORY_MODEL_CLASSES[cfg.model](cfg.heads, cfg)
        # pure functions of the weights: nothing here refers back to this module's tensors
        self._memory_fn: MemoryFn = type(self.memory_model).memory_fn
        written_out = getattr(type(self.memory_model), "chunk_grads", None)  # MLPMemory's
        self._chunk_grads = written_out or _build_chunk_grads(self._memory_fn)
        self._one_chunk_grads = getattr(type(self.memory_model), "one_chunk_grads", None)
        # fixed by the structure built above; asked on every store and read
        self._weight_names = tuple(name for name, _ in self.memory_model.named_parameters())

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        """Fresh memory: no learned change yet (the weights are the pretrained initial ones),
        zero momentum, an empty chunk buffer.

        ``weights``/``pending``/``momentum`` hold the stream's *change* from the pretrained
        weights ``memory_model``: forgetting pulls it back to zero, i.e. towards the pretrained
        memory, never the weights themselves to zero (a depth-2 MLP at zero is a saddle).
        """
        ref = self.to_k.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        weights = {
            name: torch.zeros(batch, *p.shape, device=device, dtype=dtype)
            for name, p in self.memory_model.named_parameters()
        }
        h, e, cap = self.heads, self.dim_head, self.chunk_size - 1

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        buffer = {
            "keys": zeros(batch, h, cap, e),
            "values": zeros(batch, h, cap, e),
            "lr": zeros(batch, h, cap),
            "momentum": zeros(batch, h, cap),
            "decay": zeros(batch, h, cap),
            "count": torch.zeros(batch, dtype=torch.int64, device=device),
        }
        state = {
            "weights": weights,
            "pending": {k: w.clone() for k, w in weights.items()},
            "momentum": {k: torch.zeros_like(w) for k, w in weights.items()},
            "seq_index": torch.zeros(batch, dtype=torch.int64, device=device),
            "buffer": buffer,
        }
        return tree(state, torch.Size([batch]), None if device is None else torch.device(device))

    def forward(  # type: ignore[override]
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict]:
        """Learn from the tokens ``store`` selects (in time order), then read for all tokens.

        The next state keeps the autograd graph (pretraining backpropagates through the
        inner loop); callers that run online detach it or run under ``torch.no_grad``.
        """
        state = self._stored(x, state, store)
        return self._read(x, state["weights"]), state

    def _stored(self, x: Tensor, state: TensorDict, store: StorePolicy) -> TensorDict:
        """The state after storing the tokens of ``x`` that ``store`` selects."""
        store = StorePolicy(store)
        if store is StorePolicy.WINDOW:
            return self._store(x, state)
        if store is StorePolicy.LAST:
            return self._store(x[:, -1:], state)
        return state

    def read_fresh(self, x: Tensor) -> Tensor:
        """:meth:`MemoryUnit.read_fresh`: a fresh state's read depends only on its weights (no
        learned change yet), so only they are made, not the whole state (every online step of
        a combining stream reads it)."""
        return self._read(x, self._fresh_weights(x))

    def forward_and_fresh(
        self, x: Tensor, state: TensorDict, store: StorePolicy
    ) -> tuple[Tensor, TensorDict, Tensor]:
        """:meth:`MemoryUnit.forward_and_fresh`: both reads of ``x`` from one set of queries
        (they depend on ``x`` only, not on the weights read)."""
        state = self._stored(x, state, store)
        q = self._queries(x)
        return self._read(x, state["weights"], q), state, self._read(x, self._fresh_weights(x), q)

    def _fresh_weights(self, x: Tensor) -> dict[str, Tensor]:
        """A fresh state's learned change (none) for the streams of ``x``."""
        return {k: x.new_zeros(x.shape[0], *getattr(self.memory_model, k).shape) for k in self._weight_names}

    def outcome_paths(self) -> tuple[StatePath, ...]:
        """The stream's learned change of the memory weights (``weights``, what retrieval reads):
        a forecast-loss step on it writes the realised error into the memory, not the backbone."""
        return tuple(("weights", name) for name in self._weight_names)

    def outcome_step(self, state: TensorDict, changes: Mapping[StatePath, Tensor]) -> TensorDict:
        """Add ``changes`` to the committed *and* the pending weights: a commit (the end of a
        ``batch_size`` of tokens) copies pending onto committed, so a change made to the committed
        weights alone would be undone by the next commit. Forgetting (eq 13) decays it like any
        other learned change, back toward the pretrained memory."""
        committed, pending = state["weights"], state["pending"]
        return replaced(
            state,
            {
                "weights": replaced(committed, {p[-1]: committed[p[-1]] + c for p, c in changes.items()}),
                "pending": replaced(pending, {p[-1]: pending[p[-1]] + c for p, c in changes.items()}),
            },
        )

    def surprise(self, x: Tensor, state: TensorDict) -> Tensor:
        """Associative loss ``mean_e (M(k) - v)^2`` of each token under the committed weights,
        ``[b, n]``: how badly the memory already knows ``x`` (eq 12, per head mean)."""
        tokens = self._token_inputs(x)
        b, h, n, e = tokens["keys"].shape
        params = self._absolute_rows(state["weights"])
        pred = self._memory_fn(params, tokens["keys"].flatten(0, 1))  # [s, n, e]
        err = (pred - tokens["values"].flatten(0, 1)).pow(2).mean(-1)
        return err.view(b, h, n).mean(1)

    def memory_weights(self, state: TensorDict) -> dict[str, Tensor]:
        """The committed memory weights of each stream, ``{name: [b, h, *w]}`` (pretrained +
        the stream's learned change)."""
        model = self.memory_model  # the pretrained weights broadcast over the streams
        return {k: state["weights"][k] + getattr(model, k) for k in self._weight_names}

    def _split(self, t: Tensor) -> Tensor:
        """``[b, n, h*e] -> [b, h, n, e]`` (``view``: ``unflatten``'s Python wrapper cost more
        than the view itself, on the online step's hot path several times)."""
        if t.shape[1] == 1:  # one token (the online step's): the heads' dim moves by a view alone
            return t.view(t.shape[0], self.heads, 1, self.dim_head)
        return t.view(*t.shape[:-1], self.heads, self.dim_head).transpose(1, 2)

    def _merge(self, y: Tensor, b: int, n: int) -> Tensor:
        """``[s, n, e] -> [b, n, h*e]``, the heads side by side (one view for one token)."""
        if n == 1:
            return y.view(b, 1, self.heads * self.dim_head)
        return y.view(b, self.heads, n, self.dim_head).transpose(1, 2).flatten(2)

    def _unmerge(self, g: Tensor) -> Tensor:
        """``[b, n, h*e] -> [s, n, e]``, :meth:`_merge` undone (``g`` contiguous)."""
        b, n, _ = g.shape
        if n == 1:
            return g.view(b * self.heads, 1, self.dim_head)
        return g.view(b, n, self.heads, self.dim_head).transpose(1, 2).flatten(0, 1)

    def _absolute(self, delta: Params) -> Params:
        """Memory weights ``[s, *w]`` from a learned change ``[s, *w]``: pretrained + change."""
        h, model = self.heads, self.memory_model  # the pretrained weights broadcast over the streams
        return {
            k: (delta[k].reshape(-1, h, *delta[k].shape[1:]) + getattr(model, k)).flatten(0, 1)
            for k in self._weight_names
        }

    def _absolute_rows(self, delta: Mapping[str, Tensor]) -> Params:
        """:meth:`_absolute` of a change ``[b, h, *w]`` as the state holds it: the same sums,
        without flattening the change only to split it again (the reads and the store of every
        online step start from the state's weights)."""
        model = self.memory_model
        return {k: (delta[k] + getattr(model, k)).flatten(0, 1) for k in self._weight_names}

    def _queries(self, x: Tensor) -> Tensor:
        """Retrieval queries ``[b, h, n, e]`` of the features ``x [b, n, d]``."""
        to_q = self.to_q if self.to_q is not None else self.to_k
        return _unit_rms(self._split(F.linear(_norm(self.retrieve_norm, x), to_q.weight)))

    def _read(self, x: Tensor, weights: Mapping[str, Tensor], q: Tensor | None = None) -> Tensor:
        """``out = W_o RMSNorm(M(q))`` per head (eq 15); ``q``: :meth:`_queries` of ``x``, when
        the caller has them."""
        b, n, _ = x.shape
        q = self._queries(x) if q is None else q  # [b, h, n, e]
        params = self._absolute_rows(weights)  # [s, *w]
        y = _norm(self.out_norm, self._memory_fn(params, q.flatten(0, 1)))  # [s, n, e]
        return F.linear(self._merge(y, b, n), self.to_out.weight)

    @property
    def writes_read_gradient(self) -> bool:
        """:meth:`read_with_vjp` has this memory's gradient written out (the MLP memory)."""
        return isinstance(self.memory_model, MLPMemory) and self.out_norm.weight is not None

    def read_with_vjp(self, x: Tensor, weights: TensorDict) -> tuple[Tensor, Callable[[Tensor], Params]]:
        """:meth:`_read` (the same operations, the same output ``[b, n, d]``), and the function
        that maps a gradient w.r.t. that output to the gradients w.r.t. each stream's weight
        change ``{name: [b, h, *w]}``, by the chain rule written out (MLP memory only, see
        :attr:`writes_read_gradient`).

        Why: the outcome step (``models.online``) takes this gradient on every matured pair,
        and autograd's graph bookkeeping cost several times the dozen small tensor operations
        it needs (as for :meth:`MLPMemory.chunk_grads`)."""
        b, n, _ = x.shape
        h = self.heads
        q = self._queries(x)  # [b, h, n, e]
        params = self._absolute_rows(weights)  # [s, *w]
        depth = len(params)
        inputs, pre = [q.flatten(0, 1)], []  # each layer's input, and the hidden pre-activations
        m = inputs[0]
        for i in range(depth):  # MLPMemory.memory_fn, keeping what the gradient needs
            m = _mm(m, params[f"w{i}"])
            if i < depth - 1:
                pre.append(m)
                m = F.gelu(m)
                inputs.append(m)
        norm_eps = self.out_norm.eps if self.out_norm.eps is not None else torch.finfo(m.dtype).eps
        gain = self.out_norm.weight
        # RMSNorm z = gain * m * r, r = (mean_e m^2 + eps)^-1/2, in F.rms_norm's own steps (the
        # same numbers), so that the gradient reuses r
        r = torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + norm_eps)
        out = F.linear(self._merge(m * r * gain, b, n), self.to_out.weight)

        def vjp(grad_out: Tensor) -> Params:
            g = self._unmerge(grad_out @ self.to_out.weight)  # [s, n, e]
            # dm = r gain dz - r^3 m mean_e(gain dz m)
            gz = g * gain
            g = r * gz - m * r.pow(3) * (gz * m).mean(-1, keepdim=True)
            grads: Params = {}
            for i in range(depth - 1, -1, -1):
                grads[f"w{i}"] = _mm(inputs[i].transpose(-1, -2), g)  # [s, i, o]
                if i:
                    g = _mm(g, params[f"w{i}"].transpose(-1, -2)) * _gelu_grad(pre[i - 1])
            return {k: grads[k].view(b, h, *grads[k].shape[1:]) for k in params}

        return out, vjp

    def _token_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Keys, values (eq 11), learning rates theta and gate logits of each token,
        ``[b, h, n, e]`` / ``[b, h, n]``."""
        xn = _norm(self.store_norm, x)
        # one matrix product for the keys and values, one for the three gates: a token's store
        # is a handful of tiny products, where each call's overhead is most of the cost
        keys, values = F.linear(xn, torch.cat([self.to_k.weight, self.to_v.weight])).chunk(2, dim=-1)
        lr, momentum, decay = self._gates(xn)  # [b, n, h] each
        return {
            "keys": _unit_rms(self._split(keys)),
            "values": self._split(values),
            "lr": _lr_map(lr, self.min_lr, self.max_lr).transpose(1, 2),  # theta
            "momentum": momentum.transpose(1, 2),
            "decay": decay.transpose(1, 2),
        }

    def _gates(self, xn: Tensor) -> tuple[Tensor, ...]:
        """The logits ``[b, n, h]`` of theta, eta and alpha: per token ("advanced") or each
        layer's bias, a learned per-head constant ("mlp", "simple")."""
        layers = (self.to_lr, self.to_momentum, self.to_decay)
        if self.variant != "advanced":
            return tuple(layer.bias.expand(*xn.shape[:-1], self.heads) for layer in layers)
        weight = torch.cat([layer.weight for layer in layers])  # [3h, d]
        bias = torch.cat([layer.bias for layer in layers])
        return F.linear(xn, weight, bias).chunk(3, dim=-1)  # (split's equal parts, no Python wrapper)

    def _store(self, x: Tensor, state: TensorDict) -> TensorDict:
        """Learn from ``x [b, m, d]`` after the buffered tokens; return the next state."""
        buffer = state["buffer"]
        next_buffer: TensorDict | dict[str, Tensor]
        if self.chunk_size == 1 and self.chunks_per_batch == 1:  # the default: nothing ever waits
            learned, next_buffer = self._learn_tokens(self._token_inputs(x), state), buffer
        else:
            chunks, valid, next_buffer = self._chunk(self._token_inputs(x), buffer)
            first_chunk = (state["seq_index"] - buffer["count"]) // self.chunk_size  # [b]
            learned = self._learn(chunks, valid, first_chunk, state)
        return tree(
            {**learned, "seq_index": state["seq_index"] + x.shape[1], "buffer": next_buffer},
            state.batch_size,
            state.device,
        )

    def _learn_tokens(self, tokens: dict[str, Tensor], state: TensorDict) -> dict[str, Params]:
        """:meth:`_learn` when every token is a chunk that every stream commits (``chunk_size``
        and ``batch_size`` 1, the default; the online step stores one token): the same
        operations on the same shapes, without the chunking and the per-stream bookkeeping,
        which cost more than the arithmetic of one token."""
        b, h = tokens["keys"].shape[:2]
        # With a graph (pretraining) the recurrences run on [s, *w], the shapes of _learn, whose
        # gradients through this loop they then give bit for bit (on [b, h, *w] the broadcast
        # gates' gradients round differently). Online (no graph) they run on the state's own
        # [b, h, *w]: elementwise, the same numbers, without reshaping the three parts' weights
        # into [s, *w] and back (a dozen operations per stored token).
        flat = torch.is_grad_enabled()

        def shaped(t: Tensor) -> Tensor:
            return t.flatten(0, 1) if flat else t

        committed, latest, momentum = (
            {k: shaped(cast(Tensor, w)) for k, w in state[part].items()}
            for part in ("weights", "pending", "momentum")
        )
        keys, values, lr = (tokens[f].flatten(0, 1) for f in ("keys", "values", "lr"))  # [s, n, *]
        eta, alpha = (torch.sigmoid(shaped(tokens[f])) for f in ("momentum", "decay"))  # [s | b, h, n]
        if self.variant == "mlp":  # plain gradient steps: no momentum, no forgetting
            eta, alpha = torch.zeros_like(eta), torch.zeros_like(alpha)
        gates, keeps = eta.unsqueeze(-1), (1 - alpha).unsqueeze(-1)  # [s | b, h, n, 1]
        n = keys.shape[1]
        for c in range(n):
            # token c as a chunk of one token (a single token, the online step's: as it is)
            one = slice(c, c + 1)
            k, v, theta, gate, keep = (
                (keys, values, lr, gates, keeps)
                if n == 1
                else (keys[:, one], values[:, one], lr[:, one], gates[..., one, :], keeps[..., one, :])
            )
            absolute = self._absolute(committed) if flat else self._absolute_rows(committed)
            grads = self._token_grads(absolute, k, v, theta)  # [s, *w]
            for name, g in grads.items():
                g = g if flat else g.view(b, h, *g.shape[1:])
                momentum[name] = gate * momentum[name] - g  # eq 14
                latest[name] = keep * latest[name] + momentum[name]  # eq 13
            committed = dict(latest)
        parts = {"weights": committed, "pending": latest, "momentum": momentum}
        if not flat:
            return parts
        return {part: {k: w.view(b, h, *w.shape[1:]) for k, w in ws.items()} for part, ws in parts.items()}

    def _token_grads(self, params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Params:
        """The gradients ``[s, *w]`` of one chunk, ``keys values [s, t, e]``, ``lr [s, t]``."""
        if self._one_chunk_grads is not None:
            return clip_surprise(self._one_chunk_grads(params, keys, values, lr), self.max_grad_norm, 1)
        chunk = self._surprise(params, keys[:, None], values[:, None], lr[:, None])
        return {k: g[:, 0] for k, g in chunk.items()}

    def _surprise(self, params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Params:
        """:attr:`_chunk_grads`, each chunk's gradient clipped (:func:`clip_surprise`):
        ``[s, c, *w]``."""
        return clip_surprise(self._chunk_grads(params, keys, values, lr), self.max_grad_norm, 2)

    def _chunk(
        self, tokens: dict[str, Tensor], buffer: TensorDict
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Split buffered + new tokens of each stream into full chunks ``[b, h, c, t, *]`` (with
        ``valid [b, c]``: the stream has that chunk) and the remainder, the next buffer."""
        size, cap, count = self.chunk_size, self.chunk_size - 1, buffer["count"]
        if cap == 0:  # every token is a chunk of its own: nothing ever waits
            valid = torch.ones(*tokens["lr"].shape[::2], dtype=torch.bool, device=count.device)
            return (
                {f: t.unsqueeze(3) for f, t in tokens.items()},
                valid,
                {k: cast(Tensor, v) for k, v in buffer.items()},
            )
        total = cap + tokens["keys"].shape[2]  # buffer slots + new tokens
        j = torch.arange(total, device=count.device)
        pending, done = count + (total - cap), (count + total - cap) // size  # [b]
        # slot j of a stream: its j-th buffered token, then its new tokens; never past the end
        idx = torch.where(j < count[:, None], j, j - count[:, None] + cap).clamp(max=total - 1)
        joined = {f: _take(torch.cat([buffer[f], tokens[f]], dim=2), idx) for f in _TOKEN_FIELDS}
        n_chunks = total // size
        valid = torch.arange(n_chunks, device=j.device) < done[:, None]  # [b, c]
        chunks = {f: t[:, :, : n_chunks * size].unflatten(2, (n_chunks, size)) for f, t in joined.items()}
        chunks["lr"] = chunks["lr"] * valid[:, None, :, None]  # missing chunks learn nothing
        rest = torch.arange(cap, device=j.device)
        keep = rest < (pending - done * size)[:, None]  # [b, cap]
        rest_idx = (done[:, None] * size + rest).clamp(max=total - 1)
        next_buffer: dict[str, Tensor] = {"count": pending - done * size}
        for f, t in joined.items():
            mask = keep.view(*keep.shape[:1], 1, cap, *([1] * (t.dim() - 3)))
            next_buffer[f] = torch.where(mask, _take(t, rest_idx), torch.zeros_like(t[:, :, :cap]))
        return chunks, valid, next_buffer

    def _learn(
        self, chunks: dict[str, Tensor], valid: Tensor, first_chunk: Tensor, state: TensorDict
    ) -> dict[str, Params]:
        """Run the inner loop over the chunks; returns committed/pending weights and momentum.

        The chunks are cut into segments at every chunk after which some stream commits; inside
        a segment each stream's committed weights are fixed, so its gradients are computed at
        once and its recurrences by one scan. When every stream has every chunk and commits after
        each (``batch_size == chunk_size``, the default), the recurrences run chunk by chunk
        without that bookkeeping: the online step stores one chunk, where it cost more than the
        arithmetic.
        """
        h = self.heads
        flat: dict[str, Params] = {
            part: {k: w.flatten(0, 1) for k, w in state[part].items()}
            for part in ("weights", "pending", "momentum")
        }
        full = bool(valid.all())  # every stream has every chunk: no per-stream bookkeeping
        if not full and not bool(valid.any()):  # no stream filled a chunk: nothing to learn this call
            return {part: {k: w.unflatten(0, (-1, h)) for k, w in ws.items()} for part, ws in flat.items()}
        committed, latest, momentum = flat["weights"], flat["pending"], flat["momentum"]
        n_chunks = valid.shape[1]
        keys, values, lr = (chunks[f].flatten(0, 1) for f in ("keys", "values", "lr"))
        eta = torch.sigmoid(chunks["momentum"].mean(-1)).flatten(0, 1)  # [s, c]
        alpha = torch.sigmoid(chunks["decay"].mean(-1)).flatten(0, 1)  # [s, c]
        if self.variant == "mlp":  # plain gradient steps: no momentum, no forgetting
            eta, alpha = torch.zeros_like(eta), torch.zeros_like(alpha)
        if full and self.chunks_per_batch == 1:
            # every stream commits after each chunk (the online step: one chunk): the recurrences
            # one chunk at a time, what the scans below compute, without their bookkeeping
            for c in range(n_chunks):
                one = slice(c, c + 1)
                grads = self._surprise(self._absolute(committed), keys[:, one], values[:, one], lr[:, one])
                gate, keep = eta[:, c, None, None], 1 - alpha[:, c, None, None]
                for name, g in grads.items():
                    momentum[name] = gate * momentum[name] - g[:, 0]  # eq 14
                    latest[name] = keep * latest[name] + momentum[name]  # eq 13
                committed = dict(latest)
            parts = {"weights": committed, "pending": latest, "momentum": momentum}
            return {part: {k: w.unflatten(0, (-1, h)) for k, w in ws.items()} for part, ws in parts.items()}
        index = first_chunk[:, None] + torch.arange(n_chunks, device=valid.device)  # [b, c]
        boundary = (index + 1) % self.chunks_per_batch == 0
        commit = (boundary & valid).repeat_interleave(h, 0)  # [s, c]
        ends = range(n_chunks) if self.chunks_per_batch == 1 else _segment_ends(boundary)
        counts = valid.repeat_interleave(h, 0)  # [s, c]
        start = 0
        for end in ends:
            seg = slice(start, end + 1)
            grads = self._surprise(self._absolute(committed), keys[:, seg], values[:, seg], lr[:, seg])
            done = None if full else counts[:, seg].sum(1)  # [s] chunks of each stream (a prefix)
            for name, g in grads.items():
                s_all, m_all = momentum_decay_scan(
                    eta[:, seg], alpha[:, seg], -g, momentum[name], latest[name]
                )
                momentum[name] = _at_step(momentum[name], s_all, done)
                latest[name] = _at_step(latest[name], m_all, done)
            committed = {k: where_rows(commit[:, end], latest[k], w) for k, w in committed.items()}
            start = end + 1
        parts = {"weights": committed, "pending": latest, "momentum": momentum}
        return {part: {k: w.unflatten(0, (-1, h)) for k, w in ws.items()} for part, ws in parts.items()}


def clip_surprise(grads: Params, max_norm: float, lead: int) -> Params:
    """Each stream-head's (and chunk's) gradient ``[*lead, *w]`` scaled down to a norm of
    ``max_norm`` over all the memory's weights where it is larger (0: no clipping).

    Why: a momentum step at a rate theta up to 1 on an MLP memory is unstable once its weights
    grow (the curvature grows with them): on ETTh1-M (48 -> 12, the default pretraining), after
    a burst of 15 and 93, surprises of 4, 408, 8,440 and 1e9 on four tokens in a row made the
    forecasts NaN from step ~8,530 on. Typical surprises there are 0.2 (99.99% under 13;
    ETTh1-S: all under 0.7). The scale is exactly 1 where nothing is clipped, so those tokens learn as before;
    it is a constant to autograd, as an optimiser's clipping is."""
    if max_norm <= 0:
        return grads
    with torch.no_grad():
        squares = [g.flatten(lead).square().sum(-1) for g in grads.values()]
        factor = (max_norm / (torch.stack(squares).sum(0).sqrt() + 1e-12)).clamp(max=1.0)
    return {k: g * factor.view(*factor.shape, *([1] * (g.dim() - lead))) for k, g in grads.items()}


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; ``torch.bmm`` for two stacks of matrices of the same length (the same kernel
    on the same operands, without ``matmul``'s broadcasting, which costs four more operations)."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def _norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)``, the same function (``nn.RMSNorm.forward``) without the module call, which
    costs as much as the normalisation of one token."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def _unit_rms(t: Tensor) -> Tensor:
    """Vectors rescaled to RMS 1, so ``|k|^2 = e``: with the loss a mean over ``e``, one step of
    learning rate theta corrects a share ~2 theta of a linear memory's error on that key.
    (``F.normalize(t, dim=-1)``'s operations, without its Python wrappers: three per step.)"""
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-12)
    return t / norm * math.sqrt(t.shape[-1])


def _lr_map(logits: Tensor, min_lr: float, max_lr: float) -> Tensor:
    """theta = max_lr * (min_lr / max_lr) ** (1 - sigmoid(z)): exponential, so the gate picks the
    order of magnitude between ``min_lr`` and ``max_lr`` (reached); constant when they meet."""
    if max_lr <= min_lr or max_lr <= 0:
        return torch.full_like(logits, max(max_lr, 0.0))
    theta = torch.exp(-math.log(max_lr / min_lr) * (1 - torch.sigmoid(logits)))
    return theta if max_lr == 1.0 else max_lr * theta  # (the default 1: no product)


def _lr_logit(theta: float, min_lr: float, max_lr: float) -> float:
    """The gate logit at which :func:`_lr_map` gives ``theta`` (clipped into its range)."""
    if max_lr <= min_lr or max_lr <= 0:
        return 0.0
    frac = 1 - math.log(max_lr / min(max(theta, min_lr), max_lr)) / math.log(max_lr / min_lr)
    frac = min(max(frac, 1e-4), 1 - 1e-4)
    return math.log(frac / (1 - frac))


def _segment_ends(boundary: Tensor) -> list[int]:
    """Chunks after which any stream commits, plus the last chunk."""
    ends = boundary.any(0).nonzero().flatten().tolist()
    last = boundary.shape[1] - 1
    return ends if ends and ends[-1] == last else [*ends, last]


def _build_chunk_grads(memory_fn: MemoryFn) -> Callable[..., Params]:
    """Per-chunk gradients ``(params [s, *w], keys [s, c, t, e], values, lr [s, c, t]) ->
    [s, c, *w]``, built once.

    Every (stream, head, chunk) gets its own copy of the weights (an expanded view) and the
    losses of the copies are summed: the gradient of that sum w.r.t. one copy is exactly that
    chunk's own gradient, what ``vmap(grad(...))`` computes, at a third of its CPU overhead
    (``memory_fn`` already broadcasts over leading weight dimensions, so no vmap is needed).
    """

    def chunk_loss(params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Tensor:
        err = (memory_fn(params, keys) - values).pow(2).mean(-1)  # eq 12, mean over e
        # theta_t weights each token's gradient; a chunk's step is their *mean*, so a chunk of
        # t tokens (a slow CMS level: 256) moves no further than one token would
        return (lr * err).sum() / keys.shape[-2]

    loss_grad = grad(chunk_loss)

    def chunk_grads(params: Params, keys: Tensor, values: Tensor, lr: Tensor) -> Params:
        n_chunks = keys.shape[1]
        copies = {k: w.unsqueeze(1).expand(w.shape[0], n_chunks, *w.shape[1:]) for k, w in params.items()}
        return loss_grad(copies, keys, values, lr)

    return chunk_grads
