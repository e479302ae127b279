"""Sampling (sample_next and its filters) and generation (prompt in one call, one step per new token)."""
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from thl_np import InferenceState, THLConfig, THLModel
from thl_np.errors import InputError, StateError
from thl_np.generation import (
    filtered_distribution,
    generate_ids,
    generate_text,
    sample_next,
    sample_rows,
    stream_text,
)
from thl_np.tokenizer import EOS_ID, Tokenizer

TOK = Tokenizer()

finite_logits = hnp.arrays(
    np.float64, st.integers(1, 40), elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False)
)


def tiny_config(**overrides):
    base = dict(dim=16, vocab_size=259, num_tiers=2, memory_slots=8, local_window=4, num_heads=4,
                head_dim=8, query_dim=8, read_topk=2)
    base.update(overrides)
    return THLConfig(**base)


@pytest.fixture(scope="module")
def model():
    return THLModel(tiny_config(), seed=0)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------- sample_next


@settings(max_examples=200, deadline=None)
@given(finite_logits, st.integers(0, 2**32 - 1))
def test_top_k_1_and_tiny_top_p_and_temperature_0_are_argmax(x, seed):
    want = int(np.argmax(x))  # numpy's argmax: the lowest id among ties, like the spec's tie rule
    rng = np.random.default_rng(seed)
    assert sample_next(x, rng, temperature=1.0, top_k=1) == want
    assert sample_next(x, rng, temperature=0.7, top_p=1e-12) == want
    assert sample_next(x, rng, temperature=0) == want


def test_greedy_ties_go_to_the_lowest_id():
    x = np.array([0.0, 3.0, 1.0, 3.0, 3.0])
    assert sample_next(x, temperature=0) == 1
    assert sample_next(x, np.random.default_rng(0), top_k=1) == 1
    assert sample_next(x, np.random.default_rng(0), top_p=1e-9) == 1
    kept, _ = filtered_distribution(x, top_k=2)
    assert kept.tolist() == [1, 3]


@settings(max_examples=300, deadline=None)
@given(finite_logits, st.integers(0, 2**32 - 1), st.floats(0.05, 5.0),
       st.none() | st.integers(1, 50), st.none() | st.floats(0.01, 1.0))
def test_never_picks_a_filtered_id(x, seed, temperature, top_k, top_p):
    kept, probs = filtered_distribution(x, temperature, top_k, top_p)
    assert len(kept) >= 1 and np.isclose(probs.sum(), 1.0)
    if top_k is not None:
        assert len(kept) <= top_k
        # every kept id scores at least as high as every dropped one (compared as sample_next sees them:
        # shifted by the max, so values closer than float precision to each other count as ties)
        z = x - x.max()
        dropped = np.setdiff1d(np.arange(len(x)), kept)
        if len(dropped):
            assert z[kept].min() >= z[dropped].max()
    rng = np.random.default_rng(seed)
    for _ in range(5):
        assert sample_next(x, rng, temperature, top_k, top_p) in set(kept.tolist())


row_settings = st.tuples(st.sampled_from([0.0, 0.05, 0.7, 1.0, 3.0]), st.none() | st.integers(1, 50),
                         st.none() | st.floats(0.01, 1.0))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.data(), st.integers(0, 2**32 - 1))
def test_sample_rows_draws_what_sample_next_draws_row_by_row(B, V, data, seed):
    # rows mix greedy, plain (batched together) and filtered settings, some with -inf ids and ties; every
    # row must get sample_next's token and leave its generator where sample_next leaves it
    x = data.draw(hnp.arrays(np.float64, (B, V), elements=st.floats(-30, 30) | st.just(-np.inf)))
    if V > 1 and data.draw(st.booleans()):
        x[:, 0] = x[:, -1]  # a tie
    x[:, data.draw(st.integers(0, V - 1))] = 1.0  # a finite logit in every row
    x = x.astype(data.draw(st.sampled_from([np.float32, np.float64])))
    settings_ = [data.draw(row_settings) for _ in range(B)]
    alone = [np.random.default_rng([seed, b]) for b in range(B)]
    together = [np.random.default_rng([seed, b]) for b in range(B)]
    for _ in range(3):
        want = [sample_next(x[b], alone[b], *settings_[b]) for b in range(B)]
        got = sample_rows(x, [(together[b], *settings_[b]) for b in range(B)])
        assert got == want and all(type(t) is int for t in got)
        assert [g.random() for g in together] == [g.random() for g in alone]


def test_sample_rows_checks_its_input():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match=r"NaN \(at id 2\) \(row 1\)"):
        sample_rows(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, np.nan]]), [(rng, 1.0, None, None)] * 2)
    with pytest.raises(InputError, match=r"every logit is -inf \(row 0\)"):
        sample_rows(np.full((1, 3), -np.inf), [(rng, 1.0, None, None)])
    with pytest.raises(InputError, match=r"shape \[B, V\]"):
        sample_rows(np.zeros(3), [(rng, 1.0, None, None)])
    with pytest.raises(InputError, match="2 sampling settings for 1 rows"):
        sample_rows(np.zeros((1, 3)), [(rng, 1.0, None, None)] * 2)
    with pytest.raises(InputError, match="top_k"):
        sample_rows(np.zeros((1, 3)), [(rng, 1.0, 0, None)])


def test_minus_inf_logits_are_never_sampled():
    x = np.array([-np.inf, 0.0, -np.inf, 0.0])
    rng = np.random.default_rng(1)
    picks = {sample_next(x, rng) for _ in range(200)}
    assert picks == {1, 3}


def test_temperature_scales_the_distribution():
    x = np.array([1.0, 2.0, 0.5, -1.0])
    for t in (0.5, 1.0, 3.0):
        kept, probs = filtered_distribution(x, temperature=t)
        full = np.zeros(len(x))
        full[kept] = probs
        np.testing.assert_allclose(full, softmax(x / t), rtol=1e-12)


def test_tiny_temperature_does_not_overflow():
    x = np.array([1.0, 2.0, 1.999])
    assert sample_next(x, np.random.default_rng(0), temperature=1e-300) == 1


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sample_frequencies_match_softmax(temperature):
    x = np.array([0.0, 1.0, 2.0, -0.5])
    rng = np.random.default_rng(123)
    n = 20000
    counts = np.bincount([sample_next(x, rng, temperature) for _ in range(n)], minlength=4)
    p = softmax(x / temperature)
    # 5 standard deviations of a binomial count: fails by chance far less than once in a million runs
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)))


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = np.log(np.array([0.2, 0.5, 0.3]))
    assert filtered_distribution(x, top_p=0.4)[0].tolist() == [1]
    assert filtered_distribution(x, top_p=0.7)[0].tolist() == [1, 2]
    assert filtered_distribution(x, top_p=0.9)[0].tolist() == [1, 2, 0]
    kept, probs = filtered_distribution(x, top_p=0.7)
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8])


def test_top_k_then_top_p():
    x = np.log(np.array([0.1, 0.4, 0.3, 0.2]))
    kept, probs = filtered_distribution(x, top_k=2, top_p=0.5)  # top-2 renormalised: 4/7, 3/7
    assert kept.tolist() == [1]


def test_same_seed_same_draws():
    x = np.random.default_rng(0).normal(size=50)
    a = [sample_next(x, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_next(x, np.random.default_rng(7)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_args(kwargs, match):
    with pytest.raises(InputError, match=match):
        sample_next(np.zeros(4), np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize(
    "logits, match",
    [
        (np.zeros((2, 3)), "shape"),
        (np.zeros(0), "shape"),
        (np.array([0.0, np.nan]), "NaN"),
        (np.array([0.0, np.inf]), r"\+inf"),
        (np.array([-np.inf, -np.inf]), "-inf"),
    ],
)
def test_bad_logits(logits, match):
    with pytest.raises(InputError, match=match):
        sample_next(logits, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- a scripted model


@dataclass
class FakeState:
    history: tuple = ()
    batch_size: int = 1

    @property
    def timestep(self):
        return len(self.history)

    def check(self, config, batch_size=None):
        pass


@dataclass
class ScriptedModel:
    """A bigram 'model': after token a it strongly predicts successor[a]. Counts its calls."""

    successor: dict
    vocab_size: int = 259
    calls: list = field(default_factory=list)

    @property
    def config(self):
        return SimpleNamespace(vocab_size=self.vocab_size)

    def _logits(self, token):
        row = np.zeros(self.vocab_size)
        row[self.successor.get(int(token), 0)] = 20.0
        return row

    def __call__(self, input_ids, state=None):
        ids = np.asarray(input_ids)
        self.calls.append(("call", ids.shape))
        history = (state.history if state else ()) + tuple(ids[0].tolist())
        return np.stack([self._logits(t) for t in ids[0]])[None], FakeState(history)

    def forward_step(self, token_ids, state):
        ids = np.asarray(token_ids)
        self.calls.append(("step", ids.shape))
        return self._logits(ids[0])[None], FakeState(state.history + (int(ids[0]),))


def chain(text: bytes, end=EOS_ID):
    """successor map that spells out `text` after its first byte, then `end`."""
    return {a: b for a, b in zip(text, [*text[1:], end], strict=True)}


def test_prompt_in_one_call_then_one_step_per_token():
    fake = ScriptedModel(chain(b"abcdefgh"))
    assert generate_text(fake, TOK, "a", max_length=5, temperature=0) == "bcdef"
    assert fake.calls == [("call", (1, 1))] + [("step", (1,))] * 4  # the 5th token is never fed back


def test_return_state_feeds_every_generated_token():
    fake = ScriptedModel(chain(b"abcdefgh"))
    text, state = generate_text(fake, TOK, "ab", max_length=3, temperature=0, return_state=True)
    assert text == "cde"
    assert state.history == tuple(b"abcde")


def test_stops_at_eos_and_leaves_it_out_of_the_text():
    fake = ScriptedModel(chain(b"abc"))
    text, state = generate_text(fake, TOK, "a", max_length=50, temperature=0, return_state=True)
    assert text == "bc"
    assert state.history == (*b"abc", EOS_ID)  # the eos is part of the carried context
    result = generate_ids(ScriptedModel(chain(b"abc")), TOK.encode("a"), max_length=50, temperature=0,
                          eos_id=EOS_ID)
    assert result.ids.tolist() == [*b"bc", EOS_ID] and result.stopped_at_eos


def test_max_length_counts_new_tokens_only():
    fake = ScriptedModel(chain(b"abcdefgh"))
    assert generate_text(fake, TOK, "abc", max_length=2, temperature=0) == "de"
    assert generate_text(fake, TOK, "abc", max_length=0, temperature=0) == ""


def test_stream_holds_back_partial_characters():
    euro = "€".encode()
    fake = ScriptedModel({ord("a"): euro[0], euro[0]: euro[1], euro[1]: euro[2], euro[2]: ord("!"),
                          ord("!"): EOS_ID})
    pieces = list(stream_text(fake, TOK, "a", max_length=10, temperature=0))
    assert pieces == ["€", "!"]


def test_stream_ends_with_a_replacement_for_a_truncated_character():
    euro = "€".encode()
    fake = ScriptedModel({ord("a"): euro[0], euro[0]: euro[1]})
    assert list(stream_text(fake, TOK, "a", max_length=2, temperature=0)) == ["\ufffd"]


def test_no_eos_stop_when_the_model_lacks_eos():
    fake = ScriptedModel({ord("a"): ord("a")}, vocab_size=256)
    assert generate_text(fake, TOK, "a", max_length=4, temperature=0) == "aaaa"


def test_empty_prompt_starts_from_eos():
    fake = ScriptedModel({EOS_ID: ord("x"), ord("x"): ord("y")})
    assert generate_text(fake, TOK, "", max_length=2, temperature=0) == "xy"
    assert fake.calls[0] == ("call", (1, 1))


def test_empty_prompt_errors():
    with pytest.raises(InputError, match="carried state"):
        generate_text(ScriptedModel({}), TOK, "", state=FakeState((1, 2)))
    with pytest.raises(InputError, match="no eos"):
        generate_text(ScriptedModel({}, vocab_size=256), TOK, "")


# ---------------------------------------------------------------------------------------- the real model


def test_greedy_is_deterministic(model):
    a = generate_text(model, TOK, "Hello", max_length=20, temperature=0)
    b = generate_text(model, TOK, "Hello", max_length=20, temperature=0)
    assert a == b


def test_seed_reproduces(model):
    kw = dict(max_length=20, temperature=1.0, top_k=50, top_p=0.95)
    a = generate_ids(model, TOK.encode("Hi"), seed=3, **kw).ids
    b = generate_ids(model, TOK.encode("Hi"), seed=3, **kw).ids
    c = generate_ids(model, TOK.encode("Hi"), seed=4, **kw).ids
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_stream_joins_to_generate_text(model):
    kw = dict(max_length=30, temperature=0.9, seed=11)
    assert "".join(stream_text(model, TOK, "abc", **kw)) == generate_text(model, TOK, "abc", **kw)


def test_greedy_ids_match_a_full_recompute(model):
    """Generation with the recurrent state equals re-running the whole sequence at every step."""
    prompt = TOK.encode("ab")
    got = generate_ids(model, prompt, max_length=6, temperature=0).ids
    seq = list(prompt)
    for _ in range(6):
        logits, _ = model(np.array([seq]))
        seq.append(int(np.argmax(logits[0, -1, :259])))
    assert got.tolist() == seq[2:]


def test_carried_state_continues_the_context(model):
    first = generate_ids(model, TOK.encode("ab"), max_length=5, temperature=0, return_state=True)
    assert first.state.timestep == 2 + len(first.ids)
    second = generate_ids(model, TOK.encode("cd"), max_length=4, temperature=0, state=first.state,
                          return_state=True)
    assert second.state.timestep == first.state.timestep + 2 + len(second.ids)
    whole = [*TOK.encode("ab"), *first.ids, *TOK.encode("cd")]
    reference = generate_ids(model, whole, max_length=4, temperature=0).ids
    assert second.ids.tolist() == reference.tolist()


def test_input_state_is_not_modified(model):
    _, state = model(TOK.encode("xyz")[None, :])
    before = {k: v.copy() for k, v in state.arrays().items()}
    generate_text(model, TOK, "q", max_length=5, seed=0, state=state, return_state=True)
    for k, v in state.arrays().items():
        np.testing.assert_array_equal(v, before[k])


def test_max_length_zero_returns_the_state_after_the_prompt(model):
    text, state = generate_text(model, TOK, "hello", max_length=0, return_state=True)
    assert text == "" and state.timestep == 5


def test_ids_beyond_the_tokenizer_are_never_sampled():
    big = THLModel(tiny_config(vocab_size=300), seed=1)
    big.params["output_head.bias"][259:] = 100.0  # the model 'wants' ids the tokenizer cannot decode
    result = generate_ids(big, TOK.encode("a"), max_length=10, temperature=1.0, seed=0, vocab_limit=259)
    assert result.ids.max() < 259
    assert isinstance(generate_text(big, TOK, "a", max_length=10, seed=0), str)


def test_small_vocab_model():
    ascii_model = THLModel(tiny_config(vocab_size=128), seed=2)
    ids = generate_ids(ascii_model, TOK.encode("hi"), max_length=20, seed=0).ids
    assert ids.max() < 128
    with pytest.raises(InputError, match="byte 0xc3.*vocab_size = 128"):
        generate_text(ascii_model, TOK, "é", max_length=3)


def test_state_errors(model):
    with pytest.raises(StateError, match="one sequence"):
        generate_text(model, TOK, "a", state=InferenceState.init(2, model.config))
    other = tiny_config(memory_slots=4)
    with pytest.raises(StateError, match="another config"):
        generate_text(model, TOK, "a", state=InferenceState.init(1, other))


def test_generation_argument_errors(model):
    with pytest.raises(InputError, match="max_length"):
        generate_text(model, TOK, "a", max_length=-1)
    with pytest.raises(InputError, match="top_p"):
        generate_text(model, TOK, "a", top_p=0)
    with pytest.raises(InputError, match="str or bytes"):
        generate_text(model, TOK, 42)


# ---------------------------------------------------------------------------------------- path choice


def test_auto_path_is_plain_only_for_small_jobs_while_the_fast_path_is_not_compiled(model, monkeypatch):
    from thl_np.engines import compiled_steps
    from thl_np.generation import SMALL_JOB_PARAMETER_STEPS, decode_path

    n = model.num_parameters()
    small = int(SMALL_JOB_PARAMETER_STEPS // n)
    monkeypatch.setattr(compiled_steps, "is_warm", lambda m: False)
    assert decode_path(model, small) == "plain"
    assert decode_path(model, small + 1) == "fast"
    monkeypatch.setattr(compiled_steps, "is_warm", lambda m: True)
    assert decode_path(model, 1) == decode_path(model, small) == "fast"
    assert decode_path(model, 1, "fast") == "fast"
    assert decode_path(model, 10**9, "plain") == "plain"
    with pytest.raises(InputError, match="path"):
        decode_path(model, 1, "quick")


def test_auto_path_sees_the_compiled_step_in_the_cache(model):
    """is_warm is true once a session of the model has stepped (in this process or in Numba's cache)."""
    from thl_np.engines.compiled_steps import is_warm
    from thl_np.generation import decode_path

    generate_text(model, TOK, "a", max_length=2, path="fast")
    assert is_warm(model) and decode_path(model, 2) == "fast"


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)])
def test_every_path_generates_the_same_text(model, kw):
    texts = {path: generate_text(model, TOK, "def f(x):", max_length=40, return_state=True, path=path, **kw)
             for path in ("plain", "fast", "auto")}
    assert texts["plain"][0] == texts["fast"][0] == texts["auto"][0]
    for key, want in texts["plain"][1].arrays().items():
        np.testing.assert_allclose(texts["fast"][1].arrays()[key], want, rtol=0, atol=1e-5, err_msg=key)


def test_path_is_refused_for_a_model_without_paths():
    with pytest.raises(InputError, match="THLModel"):
        generate_text(ScriptedModel({}), TOK, "a", max_length=2, path="fast")
