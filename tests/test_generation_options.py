"""Generation options: stop strings, repetition and presence penalties, several prompts as one batch, the
state of a batch's rows, and the same options on `thl-np generate` (--stop, --echo, --file)."""
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from thl_np import InferenceState, THLConfig, THLModel
from thl_np.cli import cli, main
from thl_np.errors import InputError, StateError
from thl_np.generation import apply_penalties, generate_ids, generate_text, stream_text
from thl_np.tokenizer import EOS_ID, Tokenizer

TOK = Tokenizer()


def tiny_config(**overrides):
    base = dict(dim=16, vocab_size=259, num_tiers=2, memory_slots=8, local_window=4, num_heads=4,
                head_dim=8, query_dim=8, read_topk=2)
    base.update(overrides)
    return THLConfig(**base)


@pytest.fixture(scope="module")
def model():
    return THLModel(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def model64():
    # float64: on the plain path a batch's products round differently from a single row's (~1e-16 here),
    # far below any tie a random prompt meets
    return THLModel(tiny_config(dtype="float64"), seed=3)


@dataclass
class ReplayState:
    history: tuple = ()


@dataclass
class ReplayModel:
    """Says ``script`` byte by byte whatever it is fed (one sequence), then eos; records what it was fed."""

    script: bytes
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(vocab_size=259))

    def _logits(self, n):
        row = np.zeros(259)
        row[self.script[n] if n < len(self.script) else EOS_ID] = 20.0
        return row

    def __call__(self, ids, state=None):
        history = (state.history if state else ()) + tuple(np.asarray(ids)[0].tolist())
        return self._logits(0)[None, None], ReplayState(history + ("|",))

    def forward_step(self, ids, state):
        history = state.history + (int(np.asarray(ids)[0]),)
        return self._logits(sum(1 for h in history[history.index("|"):] if h != "|"))[None], ReplayState(history)


# ---------------------------------------------------------------------------------------- stop strings


def test_stop_cuts_before_the_first_occurrence_of_any_stop_string():
    fake = ReplayModel(b"one, two; three; four")
    assert generate_text(fake, TOK, "x", max_length=50, temperature=0, stop=";") == "one, two"
    assert generate_text(fake, TOK, "x", max_length=50, temperature=0, stop=["three", ", "]) == "one"
    assert generate_text(fake, TOK, "x", max_length=50, temperature=0, stop="absent") == "one, two; three; four"
    # a stop string split over the end of max_length is not a stop: the text is returned as it is
    assert generate_text(fake, TOK, "x", max_length=6, temperature=0, stop="two") == "one, t"


def test_stream_holds_back_what_may_start_a_stop_string():
    fake = ReplayModel(b"abcabd!")
    pieces = list(stream_text(fake, TOK, "x", max_length=50, temperature=0, stop="abd"))
    assert "".join(pieces) == "abc" and all(pieces)
    assert pieces == ["abc"]   # "ab" of the second "ab..." was held back, then dropped with the stop string
    pieces = list(stream_text(fake, TOK, "x", max_length=50, temperature=0, stop="abx"))
    assert pieces == ["abc", "abd", "!"]   # each "ab" waits for the byte that shows it is not "abx"


def test_stop_with_return_state_has_fed_the_stop_string():
    fake = ReplayModel(b"hello world")
    text, state = generate_text(fake, TOK, "x", max_length=50, temperature=0, stop="o w", return_state=True)
    assert text == "hell"
    fed = bytes(h for h in state.history if h != "|")
    assert fed == b"xhello w"   # the prompt, the text and the stop string, nothing after it


def test_stop_state_continues_after_the_stop_string():
    """On the shipped model: the state after a stop equals the prompt + text + stop string prefilled."""
    model = THLModel.from_pretrained("default")
    kw = dict(max_length=60, temperature=0, path="plain")
    full = generate_text(model, None, "def f(x):", **kw)
    stop = full[10:13]
    assert stop.isascii() and stop in full
    text, state = generate_text(model, None, "def f(x):", stop=stop, return_state=True, **kw)
    assert text == full[:full.index(stop)]
    _, want = model.prompt(TOK.encode("def f(x):" + text + stop)[None], path="plain")
    assert state.timestep == want.timestep
    for key, value in want.arrays().items():
        np.testing.assert_allclose(state.arrays()[key], value, rtol=0, atol=1e-6, err_msg=key)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 30), st.integers(1, 4))
def test_stop_equals_cutting_the_full_text(model, start, length):
    full = generate_text(model, TOK, "ab", max_length=40, temperature=0)
    stop = full[start:start + length]
    if not stop:
        return
    got = generate_text(model, TOK, "ab", max_length=40, temperature=0, stop=stop)
    assert got == full[:full.index(stop)]
    assert "".join(stream_text(model, TOK, "ab", max_length=40, temperature=0, stop=stop)) == got


@pytest.mark.parametrize("stop", ["", [""], ["a", 3], 7])
def test_bad_stop_strings(stop):
    with pytest.raises(InputError, match="stop"):
        generate_text(ReplayModel(b"a"), TOK, "x", stop=stop)


# ---------------------------------------------------------------------------------------- penalties


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, 12, elements=st.floats(-20, 20)), hnp.arrays(np.bool_, 12),
       st.floats(0.1, 5), st.floats(-3, 3))
def test_penalties_follow_their_definitions(x, seen, r, p):
    got = apply_penalties(x, seen, r, p)
    for i in range(12):
        if not seen[i]:
            assert got[i] == x[i]
        else:
            want = (x[i] / r if x[i] > 0 else x[i] * r) - p
            assert got[i] == pytest.approx(want, abs=1e-12)


def test_presence_penalty_forbids_any_repeat_in_greedy_decoding(model):
    ids = generate_ids(model, TOK.encode("aaa"), max_length=40, temperature=0, presence_penalty=1e4).ids
    assert len(set(ids.tolist())) == 40 and ord("a") not in ids.tolist()
    plain = generate_ids(model, TOK.encode("aaa"), max_length=40, temperature=0).ids
    assert len(set(plain.tolist())) < 40   # without it this model repeats itself


def test_repetition_penalty_matches_a_step_by_step_reference(model):
    r = 1.7
    got = generate_ids(model, TOK.encode("hello"), max_length=12, temperature=0, repetition_penalty=r,
                       presence_penalty=0.3).ids
    seq = list(TOK.encode("hello"))
    logits, state = model.prompt(np.array([seq]))
    for _ in range(12):
        x = np.asarray(logits[0], np.float64).copy()
        for i in set(seq):
            x[i] = (x[i] / r if x[i] > 0 else x[i] * r) - 0.3
        token = int(np.argmax(x))
        seq.append(token)
        logits, state = model.forward_step(np.array([token]), state)
    assert got.tolist() == seq[5:]


@pytest.mark.parametrize("kw, match", [(dict(repetition_penalty=0), "repetition_penalty"),
                                       (dict(repetition_penalty=float("nan")), "repetition_penalty"),
                                       (dict(presence_penalty=float("inf")), "presence_penalty")])
def test_bad_penalties(model, kw, match):
    with pytest.raises(InputError, match=match):
        generate_text(model, TOK, "a", max_length=2, **kw)


# ---------------------------------------------------------------------------------------- several prompts

prompt_lists = st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10), min_size=1,
                        max_size=4)
options = st.sampled_from([dict(temperature=0), dict(temperature=0.8, top_k=40, seed=7),
                           dict(temperature=1.0, top_p=0.9, seed=[1, 2, 3, 4]),
                           dict(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, stop="e")])


@settings(max_examples=20, deadline=None)
@given(prompt_lists, options, st.integers(0, 10), st.sampled_from(["fast", "plain"]))
def test_a_batch_gives_each_prompt_its_own_result(model, model64, prompts, kw, max_length, path):
    """Fast path: float32, identical bits. Plain path: float64, so that the batch's rounding (~1e-16)
    meets no tie."""
    model = model if path == "fast" else model64
    kw = dict(kw)
    if isinstance(kw.get("seed"), list):
        kw["seed"] = kw["seed"][:len(prompts)]
    batch = generate_text(model, TOK, prompts, max_length=max_length, path=path, return_state=True, **kw)
    assert len(batch) == len(prompts)
    for i, (prompt, (text, state)) in enumerate(zip(prompts, batch, strict=True)):
        one = dict(kw, seed=kw["seed"][i]) if isinstance(kw.get("seed"), list) else kw
        want_text, want_state = generate_text(model, TOK, prompt, max_length=max_length, path=path,
                                              return_state=True, **one)
        assert text == want_text
        assert state.batch_size == 1 and state.timestep == want_state.timestep
        for key, value in want_state.arrays().items():
            np.testing.assert_allclose(state.arrays()[key], value, rtol=0, atol=0 if path == "fast" else 1e-12,
                                       err_msg=key)


def test_float32_fast_batch_is_identical_to_single_prompts(model):
    prompts = ["def f(x):", "", "a", "import numpy as np\n"]
    kw = dict(max_length=25, temperature=0.9, seed=11, path="fast")
    assert generate_text(model, TOK, prompts, **kw) == [generate_text(model, TOK, p, **kw) for p in prompts]


def test_a_batch_continues_carried_states(model):
    _, first = generate_text(model, TOK, "abc", max_length=3, temperature=0, return_state=True)
    _, second = generate_text(model, TOK, "xyz", max_length=3, temperature=0, return_state=True)
    kw = dict(max_length=8, temperature=0)
    shared = generate_text(model, TOK, ["1", "22"], state=first, **kw)
    assert shared == [generate_text(model, TOK, p, state=first, **kw) for p in ["1", "22"]]
    each = generate_text(model, TOK, ["1", "22"], state=[first, second], **kw)
    assert each == [generate_text(model, TOK, "1", state=first, **kw),
                    generate_text(model, TOK, "22", state=second, **kw)]
    assert generate_text(model, TOK, [], **kw) == []


def test_batch_errors(model):
    short = InferenceState.init(1, model.config)
    _, later = generate_text(model, TOK, "abc", max_length=1, return_state=True)
    with pytest.raises(StateError, match="different steps"):
        generate_text(model, TOK, ["a", "b"], state=[short, later])
    with pytest.raises(StateError, match="one per prompt"):
        generate_text(model, TOK, ["a", "b"], state=[short])
    with pytest.raises(InputError, match="seed"):
        generate_text(model, TOK, ["a", "b"], seed=[1])


def test_state_rows_and_stack_round_trip(model):
    _, state = model.prompt(TOK.encode("abcdef").reshape(2, 3))
    parts = [state.rows([0]), state.rows([1])]
    again = InferenceState.stack(parts)
    for key, value in state.arrays().items():
        np.testing.assert_array_equal(again.arrays()[key], value, err_msg=key)
    with pytest.raises(StateError, match="not rows"):
        state.rows([2])


# ---------------------------------------------------------------------------------------- the CLI


def run(*args, input=None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(str(out))
    return str(out)


def test_cli_stop_echo_and_penalties(model_dir, model):
    args = ("--model", model_dir, "--max-length", "30", "--temperature", "0")
    full = run("generate", "ab", *args)
    stop = full[5:7]
    assert run("generate", "ab", *args, "--stop", stop, "--stop", "\x00") == full[:full.index(stop)]
    assert run("generate", "ab", *args, "--echo") == "ab" + full
    want = generate_text(model, TOK, "ab", max_length=30, temperature=0, repetition_penalty=1.4,
                         presence_penalty=0.2)
    assert run("generate", "ab", *args, "--repetition-penalty", "1.4", "--presence-penalty", "0.2") == want


def test_cli_file_of_prompts(model_dir, model, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("def f(x):\n\nHello\r\nx\n")
    args = ("--model", model_dir, "--max-length", "12", "--temperature", "0.7", "--seed", "4")
    rows = [json.loads(line) for line in run("generate", "--file", str(text), *args).splitlines()]
    assert [r["prompt"] for r in rows] == ["def f(x):", "Hello", "x"]
    assert [r["text"] for r in rows] == [run("generate", p, *args) for p in ["def f(x):", "Hello", "x"]]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('"a\\nb"\n{"prompt": "c", "seed": 9}\n')
    rows = [json.loads(line) for line in run("generate", "--file", str(jsonl), *args, "--echo").splitlines()]
    assert rows[0]["text"] == "a\nb" + generate_text(model, TOK, "a\nb", max_length=12, temperature=0.7, seed=4)
    assert rows[1]["text"] == "c" + generate_text(model, TOK, "c", max_length=12, temperature=0.7, seed=9)


@pytest.mark.parametrize("content, extra, match", [
    ("a\n", ["PROMPT"], "not both"),
    ("a\n", ["--state-out", "s.npz"], "--state-out"),
    ("\n\n", [], "no prompt"),
    ("{oops\n", [], "line 1 is not JSON"),
    ('{"prompt": 3}\n', [], "line 1 must be"),
    ("a\n", ["--repetition-penalty", "0"], "--repetition-penalty"),
    ("a\n", ["--stop", ""], "--stop"),
])
def test_cli_file_errors_are_one_line(model_dir, tmp_path, capsys, content, extra, match):
    path = tmp_path / ("p.jsonl" if content.startswith(("{", "\"")) else "p.txt")
    path.write_text(content)
    code = main(["generate", "--file", str(path), "--model", model_dir, *extra])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and match in err, err


def test_shell_completion_offers_the_new_flags():
    """The README's `eval "$(_THL_NP_COMPLETE=bash_source thl-np)"`: click answers completions for thl-np."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "_THL_NP_COMPLETE": "bash_complete", "COMP_WORDS": "thl-np generate --st", "COMP_CWORD": "2"}
    out = subprocess.run([sys.executable, "-m", "thl_np"], env=env, capture_output=True, text=True, timeout=60)
    assert "plain,--stop" in out.stdout and "plain,--state-in" in out.stdout, out.stdout + out.stderr
    env["_THL_NP_COMPLETE"] = "bash_source"
    script = subprocess.run([sys.executable, "-m", "thl_np"], env=env, capture_output=True, text=True, timeout=60)
    assert "_thl_np_completion" in script.stdout


def test_cli_file_from_stdin(model_dir):
    args = ("--model", model_dir, "--max-length", "6", "--temperature", "0")
    rows = [json.loads(line) for line in run("generate", "--file", "-", *args, input="ab\ncd\n").splitlines()]
    assert [r["text"] for r in rows] == [run("generate", "ab", *args), run("generate", "cd", *args)]
