"""State bytes per stream and time of one update+forecast, per memory type and update mode.

Prints one line per (model, mode, streams): the default configuration of each memory type,
1 stream and 64 streams batched, through ``models.online.observe`` (the service's code path).
Not a test: numbers depend on the machine and its load.

    python bench/model_costs.py [--steps 10] [--streams 1 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from models import ContinualForecaster, ModelConfig, UpdateMode, init_stream_state, observe, observe_many
from models.state_io import state_nbytes

DEFAULTS = {
    "lstm+titans": ModelConfig(backbone="lstm", memory="titans"),
    "tcn+fsnet": ModelConfig(backbone="tcn", memory="fsnet"),
    "tcn+fsnet_nomem": ModelConfig(backbone="tcn", memory="fsnet_nomem"),
    "titans(MAL)": ModelConfig(backbone="titans", memory="titans", fusion="layer"),
    "lstm (no memory)": ModelConfig(backbone="lstm", memory="none"),
}


def measure(config: ModelConfig, mode: UpdateMode, streams: int, steps: int) -> tuple[int, float]:
    model = ContinualForecaster(config).requires_grad_(False)
    warm = config.seq_len + config.pred_len + 2
    values = torch.randn(streams, warm + steps, config.channels)
    state, _ = observe_many(model, init_stream_state(model, streams, mode), values[:, :warm], mode)
    start = time.perf_counter()
    for t in range(steps):
        state, _ = observe(model, state, values[:, warm + t], mode)
    return state_nbytes(state) // streams, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'model':18} {'mode':12} {'streams':>7} {'state B/stream':>15} {'ms/step':>9} {'obs/s':>8}")
    for name, config in DEFAULTS.items():
        for mode in (UpdateMode.MEMORY_ONLY, UpdateMode.FULL_MODEL):
            for streams in args.streams:
                nbytes, seconds = measure(config, mode, streams, args.steps)
                print(
                    f"{name:18} {mode.value:12} {streams:7d} {nbytes:15,d} "
                    f"{seconds * 1e3:9.1f} {streams / seconds:8.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
