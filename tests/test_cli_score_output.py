"""`mixtral-jax score` output: JSON stays JSON (null for a value that is not finite), and a perplexity too
large for a float is inf rather than an OverflowError."""

import json
import math

import pytest

from mixtral_jax.cli.score import report

IDS = [1, 5, 9]


@pytest.mark.parametrize("logprobs, nll, perplexity", [
    ([-1.0, -2.0], 1.5, math.exp(1.5)),
    ([-1.0, math.nan], None, None),
    ([-1.0, -math.inf], None, None),
    ([-1000.0, -1000.0], 1000.0, None),  # e ** 1000 overflows a float
])
def test_score_json_parses_with_null_for_what_is_not_finite(logprobs, nll, perplexity):
    line = report(IDS, logprobs, as_json=True)
    assert "NaN" not in line and "Infinity" not in line
    result = json.loads(line)
    assert result["ids"] == IDS and result["nll"] == nll and result["perplexity"] == perplexity
    assert result["logprobs"] == [x if math.isfinite(x) else None for x in logprobs]


def test_score_text_says_inf_for_a_perplexity_past_the_float_range():
    assert report(IDS, [-1000.0, -1000.0], as_json=False) == "3 tokens: nll 1000.0000 nats/token, perplexity inf"
    assert report(IDS, [-1.0, math.nan], as_json=False) == "3 tokens: nll nan nats/token, perplexity nan"
