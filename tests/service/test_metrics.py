"""service.metrics: counting a request's scored errors per bucket equals observing each."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.utils import floatToGoString

from service.metrics import ERROR_BUCKETS, observe_all


def histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("errors", "scored errors", buckets=ERROR_BUCKETS, registry=registry)


def test_observe_all_equals_one_observe_per_value() -> None:
    rng = random.Random(0)
    batches = [[abs(rng.gauss(0, 1.5)) for _ in range(rng.randint(0, 40))] for _ in range(30)]
    batches.append(list(ERROR_BUCKETS))  # every bound itself: a value on a bound is in that bucket
    one, many = CollectorRegistry(), CollectorRegistry()
    each, counted = histogram(one), histogram(many)
    for values in batches:
        for v in values:
            each.observe(v)
        observe_all(counted, values)
    for bound in (*ERROR_BUCKETS, float("inf")):
        labels = {"le": floatToGoString(bound)}
        expected = one.get_sample_value("errors_bucket", labels)
        assert expected is not None and many.get_sample_value("errors_bucket", labels) == expected, bound
    assert many.get_sample_value("errors_count") == one.get_sample_value("errors_count")
    assert many.get_sample_value("errors_sum") == pytest.approx(one.get_sample_value("errors_sum"), rel=1e-12)
    assert one.get_sample_value("errors_count") == sum(len(b) for b in batches)
