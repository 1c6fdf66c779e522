"""Every request validation error names the parameter and the offending value."""

import math

import pytest

from fastserve_ray.engine import (
    RequestError,
    SamplingParams,
    Sequence,
    validate_prompt,
    validate_request,
)
from fastserve_ray.errors import FastServeError


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        (dict(temperature=math.nan), "temperature", "got nan"),
        (dict(temperature=math.inf), "temperature", "got inf"),
        (dict(temperature=-0.1), "temperature", "got -0.1"),
        (dict(temperature=2.5), "temperature", "in [0, 2], got 2.5"),
        (dict(temperature="hot"), "temperature", "got 'hot'"),
        (dict(top_p=0.0), "top_p", "(0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p", "got 1.5"),
        (dict(top_p=math.nan), "top_p", "got nan"),
        (dict(max_tokens=0), "max_tokens", ">= 1, got 0"),
        (dict(max_tokens=-3), "max_tokens", "got -3"),
        (dict(max_tokens=2.5), "max_tokens", "got 2.5"),
        (dict(max_tokens=True), "max_tokens", "got True"),
        (dict(top_k=-2), "top_k", "got -2"),
        (dict(top_k=1.5), "top_k", "got 1.5"),
        (dict(seed=-1), "seed", "got -1"),
        (dict(seed=2**64), "seed", f"got {2**64}"),
        (dict(seed="x"), "seed", "got 'x'"),
        (dict(stop=[""]), "stop", "got ''"),
        (dict(stop=["ok", 3]), "stop", "got 3"),
        (dict(stop=5), "stop", "got 5"),
        (dict(stop_token_ids=[-1]), "stop_token_ids", "token id -1"),
        (dict(stop_token_ids=["a"]), "stop_token_ids", "token id 'a'"),
        (dict(logprobs=-1), "logprobs", "got -1"),
        (dict(logprobs=21), "logprobs", "[0, 20] or null, got 21"),
        (dict(ignore_eos="yes"), "ignore_eos", "got 'yes'"),
        (dict(min_p=-0.1), "min_p", "[0, 1], got -0.1"),
        (dict(min_p=1.5), "min_p", "got 1.5"),
        (dict(min_p=math.nan), "min_p", "got nan"),
        (dict(min_p="x"), "min_p", "got 'x'"),
        (dict(min_p=True), "min_p", "got True"),
        (dict(logit_bias={"abc": 1}), "logit_bias", "got 'abc'"),
        (dict(logit_bias={"-1": 1}), "logit_bias", "got '-1'"),
        (dict(logit_bias={"1.5": 1}), "logit_bias", "got '1.5'"),
        (dict(logit_bias={"\u0661": 1}), "logit_bias", "token ids"),  # a non-ASCII digit
        (dict(logit_bias={-3: 1}), "logit_bias", "got '-3'"),
        (dict(logit_bias={"5": 100.5}), "logit_bias", "[-100, 100], got 100.5"),
        (dict(logit_bias={"5": -101}), "logit_bias", "got -101"),
        (dict(logit_bias={"5": math.nan}), "logit_bias", "got nan"),
        (dict(logit_bias={"5": math.inf}), "logit_bias", "got inf"),
        (dict(logit_bias={"5": 10**400}), "logit_bias", "got inf"),
        (dict(logit_bias={"5": "1"}), "logit_bias", "must be a number, got '1'"),
        (dict(logit_bias={"5": True}), "logit_bias", "got True"),
        (dict(logit_bias={"5": None}), "logit_bias", "got None"),
        (dict(logit_bias={"5": 1, "05": 2}), "logit_bias", "token id 5 appears twice"),
        (dict(logit_bias=[1, 2]), "logit_bias", "(id, bias) pairs"),
        (dict(logit_bias="5"), "logit_bias", "got str"),
        (dict(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias", "at most 1024 tokens, got 1025"),
    ],
)
def test_sampling_params_errors_name_param_and_value(kwargs, param, needle):
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)
    assert needle in str(info.value)


def test_request_error_is_a_client_error_with_openai_fields():
    err = RequestError("bad", "top_p")
    assert isinstance(err, FastServeError) and isinstance(err, ValueError)
    assert (err.message, err.param, err.type, err.code) == ("bad", "top_p", "invalid_request_error",
                                                            None)


def test_valid_params_are_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4], top_k=-1, temperature=0)
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4) and p.top_k == 0
    assert p.is_greedy
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(temperature=2, top_p=1, seed=0, logprobs=0, top_k=5).seed == 0


def test_logit_bias_is_normalised_to_sorted_pairs_and_checked_against_vocab():
    p = SamplingParams(logit_bias={"7": 1, 3: -2.5, "0": 100})
    assert p.logit_bias == ((0, 100.0), (3, -2.5), (7, 1.0))
    assert SamplingParams(logit_bias=[(2, 1.0)]).logit_bias == ((2, 1.0),)
    assert SamplingParams(logit_bias=None).logit_bias == () == SamplingParams().logit_bias
    assert p == SamplingParams(logit_bias=[(7, 1), (0, 100), (3, -2.5)]) and hash(p)  # frozen
    p.validate(vocab_size=8)
    with pytest.raises(RequestError) as info:
        p.validate(vocab_size=7)
    assert info.value.param == "logit_bias"
    assert "token id 7 is outside the vocabulary [0, 7)" in str(info.value)


def test_stop_token_ids_checked_against_vocab():
    p = SamplingParams(stop_token_ids=[5, 100])
    p.validate(vocab_size=101)
    with pytest.raises(RequestError) as info:
        p.validate(vocab_size=100)
    assert info.value.param == "stop_token_ids"
    assert "token id 100 is outside the vocabulary [0, 100)" in str(info.value)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "param", "needle"),
    [
        ([], 4, "prompt", "at least one token, got an empty prompt"),
        ([1, 2, 100], 4, "prompt", "token id 100 at position 2 is outside the vocabulary [0, 100)"),
        ([-1], 4, "prompt", "token id -1 at position 0"),
        ([1, 2.0], 4, "prompt", "token id 2.0 at position 1"),
        ("hello", 4, "prompt", "list of token ids, got str"),
        ([1] * 10, 7, "max_tokens", "prompt (10 tokens) + max_tokens (7) = 17 exceeds"),
        ([1] * 16, 1, "prompt", "max_model_len=16"),
    ],
)
def test_prompt_errors_name_param_and_value(prompt, max_tokens, param, needle):
    with pytest.raises(RequestError) as info:
        validate_prompt(prompt, max_tokens=max_tokens, vocab_size=100, max_model_len=16)
    assert info.value.param == param
    assert needle in str(info.value)


def test_valid_prompt_passes_and_comes_back_as_a_list():
    assert validate_prompt((1, 2, 3), max_tokens=13, vocab_size=100, max_model_len=16) == [1, 2, 3]


def test_validate_request_checks_params_then_prompt():
    params = SamplingParams(max_tokens=4, stop_token_ids=[99])
    assert validate_request([1, 2], params, vocab_size=100, max_model_len=8) == [1, 2]
    with pytest.raises(RequestError, match="stop_token_ids"):
        validate_request([1, 2], params, vocab_size=50, max_model_len=8)
    with pytest.raises(RequestError, match="max_tokens \\(4\\)"):
        validate_request([1] * 5, params, vocab_size=100, max_model_len=8)


def test_sequence_rejects_empty_prompt():
    with pytest.raises(RequestError) as info:
        Sequence([])
    assert info.value.param == "prompt"


def test_numpy_numbers_are_accepted_like_python_ones():
    np = pytest.importorskip("numpy")
    p = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), seed=np.uint64(3))
    assert p.max_tokens == 4
    ids = np.array([1, 2, 3])
    assert validate_prompt(list(ids), max_tokens=2, vocab_size=10, max_model_len=8) == [1, 2, 3]
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=np.bool_(True))
