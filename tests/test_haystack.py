"""The passkey haystacks (thl_np.training.haystack): real Python source at a random depth, its validation, and the
`thl-np eval --passkey --filler source --depth LO:HI` flags."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np import THLConfig, THLModel
from thl_np.cli import main
from thl_np.errors import InputError
from thl_np.eval.long_context import passkey_eval
from thl_np.eval.trace import passkey_trace, passkey_trial
from thl_np.training.haystack import (
    FILLERS,
    FROZEN_SOURCE,
    PACKAGE_DIR,
    Haystack,
    freeze_source,
    haystack_prompt,
    load_frozen_source,
    load_source,
    parse_depth,
)

PY = FILLERS["python"]
SOURCE = Haystack("source")   # thl-np's own sources, frozen, read once


def parts(prompt: bytes, at: int, key: str):
    """(haystack text, key line, question) of a prompt whose key line starts at ``at``."""
    key_line, question = PY["key"].format(key=key).encode(), PY["question"].encode()
    assert prompt[at:at + len(key_line)] == key_line and prompt.endswith(question)
    return prompt[:at] + prompt[at + len(key_line):len(prompt) - len(question)], key_line, question


def check_prompt(prompt: bytes, at: int, key: str, length: int, depth, corpus: bytes):
    text, key_line, question = parts(prompt, at, key)
    assert len(prompt) == length
    assert prompt.count(key_line) == 1 and prompt.count(key.encode()) == 2    # the key, in its line only
    mentions = key_line.count(b"pass key") + question.count(b"pass key")
    assert prompt.count(question) == 1 and prompt.lower().count(b"pass key") == mentions
    assert at == 0 or prompt[at - 1:at] == b"\n"                               # at a line boundary
    assert text == b"" or text.endswith(b"\n")                                # the question starts a line
    assert text in corpus                                                     # one contiguous span
    lo, hi = parse_depth(depth)
    n = len(text)
    inside = [e for e in [0] + [i + 1 for i in range(n) if text[i:i + 1] == b"\n"] if lo * n <= e <= hi * n]
    if inside:            # a boundary inside the range exists: the key is at one of them
        assert lo * n <= at <= hi * n
    return text


@pytest.mark.parametrize("length", [109, 110, 300, 1024, 4096, 16384])
@pytest.mark.parametrize("depth", [(0.1, 0.9), 0.5, (0.0, 1.0), "0.3:0.35"])
def test_source_prompt_exact_length_one_key_at_a_boundary_in_range(length, depth):
    for seed in range(3):
        prompt, at = haystack_prompt(length, "40719", depth, SOURCE, np.random.default_rng([seed, length]))
        check_prompt(prompt, at, "40719", length, depth, SOURCE.source.data)


def test_source_prompts_are_reproducible_by_seed_and_differ_across_seeds():
    def make(seed):
        return haystack_prompt(2048, "12345", "0.1:0.9", SOURCE, np.random.default_rng(seed))

    assert make(7) == make(7)
    prompts = {make(s) for s in range(8)}
    assert len(prompts) == 8                                    # spans differ
    assert len({at for _, at in prompts}) > 1                   # and so do the depths


@settings(max_examples=40, deadline=None)
@given(length=st.integers(109, 6000), seed=st.integers(0, 2**32 - 1),
       lo=st.floats(0, 1), width=st.floats(0, 1), key=st.integers(0, 99999))
def test_source_prompt_properties(length, seed, lo, width, key):
    key = f"{key:05d}"
    hi = min(1.0, lo + width)
    prompt, at = haystack_prompt(length, key, (lo, hi), SOURCE, np.random.default_rng(seed))
    check_prompt(prompt, at, key, length, (lo, hi), SOURCE.source.data)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(300, 3000), seed=st.integers(0, 2**32 - 1), lo=st.floats(0, 0.5),
       filler=st.sampled_from(["python", "prose"]))
def test_filler_lines_take_a_depth_range_too(length, seed, lo, filler):
    hay = Haystack(filler)
    hi = lo + 0.4
    prompt, at = haystack_prompt(length, "55555", (lo, hi), hay, np.random.default_rng(seed))
    f = FILLERS[filler]
    key_line, question = f["key"].format(key="55555").encode(), f["question"].encode()
    n = length - len(key_line) - len(question)
    longest = max(map(len, f["lines"]))
    assert len(prompt) == length and prompt[at:].startswith(key_line) and prompt.endswith(question)
    assert at == 0 or prompt[at - 1:at] == b"\n"
    assert lo * n - longest <= at <= hi * n + longest and (n < 2 * longest or lo * n <= at <= hi * n)


def test_the_default_corpus_is_the_frozen_package_sources_without_pass_key_lines():
    src = load_source()
    # the published passkey and recall figures were measured on exactly these bytes
    assert src.folder == FROZEN_SOURCE + ".txt.gz" and src.fingerprint == "a22e32e1af82f4d2"
    assert src.files == 130 and len(src.data) == 1_198_456
    assert b"def haystack_prompt(" in src.data and b"class THLModel" in src.data
    assert b"pass key" not in src.data.lower()               # FILLERS' own lines are left out
    assert src.data.endswith(b"\n") and src.line_ends[-1] == len(src.data)
    assert SOURCE.describe()["kind"] == "source" and SOURCE.describe()["fingerprint"] == src.fingerprint


def test_the_live_package_sources_freeze_and_load_back_and_damage_is_refused(tmp_path):
    live = load_source(PACKAGE_DIR)
    assert live.folder == PACKAGE_DIR and live.files > 100 and b"pass key" not in live.data.lower()
    freeze_source(live, str(tmp_path / "h"))
    back = load_frozen_source(str(tmp_path / "h"))
    assert back.data == live.data and back.files == live.files and back.fingerprint == live.fingerprint
    assert np.array_equal(back.line_ends, live.line_ends)
    first = (tmp_path / "h.txt.gz").read_bytes()
    freeze_source(live, str(tmp_path / "h"))
    assert (tmp_path / "h.txt.gz").read_bytes() == first                       # reproducible: no timestamp
    freeze_source(back, str(tmp_path / "g"))
    (tmp_path / "g.json").write_text((tmp_path / "g.json").read_text().replace(back.fingerprint, "0" * 16))
    with pytest.raises(InputError, match="damaged"):
        load_frozen_source(str(tmp_path / "g"))
    with pytest.raises(InputError, match="cannot be read"):
        load_frozen_source(str(tmp_path / "missing"))


def test_a_haystack_dir_is_read_in_sorted_order_and_validated(tmp_path):
    (tmp_path / "b.py").write_text("y = 2\n" * 40)
    (tmp_path / "a.py").write_text("x = 1")                   # no final newline: one is added
    (tmp_path / "notes.txt").write_text("z = 3\n" * 100)      # not .py: not read
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("# the pass key is 12345\nw = 4\n")
    src = load_source(tmp_path)
    assert src.files == 3 and src.data == b"x = 1\n" + b"y = 2\n" * 40 + b"w = 4\n"
    hay = Haystack("source", tmp_path)
    prompt, at = haystack_prompt(200, "11111", 0.5, hay, np.random.default_rng(0))
    check_prompt(prompt, at, "11111", 200, 0.5, src.data)
    with pytest.raises(InputError, match="too few for a 400-byte prompt"):
        haystack_prompt(400, "11111", 0.5, hay, np.random.default_rng(0))
    with pytest.raises(InputError, match="not a folder"):
        Haystack("source", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .py source"):
        Haystack("source", tmp_path / "empty")
    with pytest.raises(InputError, match="'source' haystack"):
        Haystack("python", tmp_path)
    with pytest.raises(InputError, match="filler = 'poetry'"):
        Haystack("poetry")


def test_a_span_holding_the_key_is_drawn_again(tmp_path):
    lines = [f"n = {i:05d}\n" for i in range(2000)]
    (tmp_path / "numbers.py").write_text("".join(lines))
    hay = Haystack("source", tmp_path)
    for seed in range(20):
        prompt, at = haystack_prompt(500, "01000", (0.1, 0.9), hay, np.random.default_rng(seed))
        assert prompt.count(b"01000") == 2 and b"n = 01000\n" not in prompt
    (tmp_path / "numbers.py").write_text("n = 77777\n" * 200)
    with pytest.raises(InputError, match="all hold"):
        haystack_prompt(500, "77777", 0.5, Haystack("source", tmp_path), np.random.default_rng(0))


def test_a_span_without_a_boundary_in_the_depth_range_is_drawn_again(tmp_path):
    """A short prompt over long lines: most spans are one line, with no line boundary inside [0.1, 0.9] of
    them, and would put the key at the span's start or end. Such a span is drawn again, so the key lands
    inside the range; where no span has such a boundary, a span is used anyway (the key at its edge)."""
    block = "x = '" + "a" * 300 + "'\n" + "".join(f"y{i} = {i}\n" for i in range(12))
    (tmp_path / "long.py").write_text(block * 40)
    hay = Haystack("source", tmp_path)
    for seed in range(30):
        prompt, at = haystack_prompt(200, "31415", (0.1, 0.9), hay, np.random.default_rng(seed))
        text = check_prompt(prompt, at, "31415", 200, (0.1, 0.9), hay.source.data)
        assert 0.1 * len(text) <= at <= 0.9 * len(text), seed
    (tmp_path / "long.py").write_text(("z = '" + "b" * 400 + "'\n") * 40)
    prompt, at = haystack_prompt(200, "31415", (0.1, 0.9), Haystack("source", tmp_path), np.random.default_rng(0))
    assert at in (0, 200 - len(PY["key"].format(key="31415")) - len(PY["question"]))


def test_parse_depth():
    assert parse_depth(0.5) == (0.5, 0.5) and parse_depth("0.25") == (0.25, 0.25)
    assert parse_depth("0.1:0.9") == (0.1, 0.9) and parse_depth((0, 1)) == (0.0, 1.0)
    for bad, why in (("0.9:0.1", "low end"), ("1.5", "depth"), ("-0.1:0.5", "depth"), ("a:b", "range"),
                     ("0.1:0.5:0.9", "range"), ((0.1,), "pair"), (float("nan"), "depth"), (True, "depth")):
        with pytest.raises(InputError, match=why):
            parse_depth(bad)


@pytest.fixture(scope="module")
def tiny():
    config = THLConfig(vocab_size=259, dim=8, num_tiers=2, tier_dims=[8, 8], tier_timescales=[1, 4], local_window=4,
                       memory_slots=8, head_dim=4, query_dim=4, num_heads=2, read_topk=2, dtype="float64")
    return THLModel(config, seed=3)


def test_passkey_eval_on_source_records_the_haystack_and_every_depth(tiny):
    report = passkey_eval(tiny, lengths=[300, 600], trials=4, depth="0.1:0.9", seed=11, filler="source")
    assert report["haystack"] == SOURCE.describe() and report["depth"] == [0.1, 0.9]
    room = SOURCE.room()
    for row in report["results"]:
        assert len(row["key_depths"]) == len(row["key_offsets"]) == 4
        for at, d in zip(row["key_offsets"], row["key_depths"], strict=True):
            assert d == round(at / (row["length"] - room), 4) and 0.1 <= d <= 0.9
        assert [s["key_offset"] for s in row["samples"]] == row["key_offsets"][:3]
    json.dumps(report)
    # the trace and the eval hide the same key at the same place
    trial = passkey_trial(600, seed=11, depth="0.1:0.9", filler="source")
    first = report["results"][1]["samples"][0]
    assert trial["key"] == first["key"] and trial["key_start"] == first["key_offset"]
    assert trial["key_depth"] == first["depth"]


def test_passkey_on_source_fast_and_plain_paths_agree(tiny):
    kw = dict(lengths=[256], trials=3, depth=(0.1, 0.9), seed=5, filler="source")
    fast, plain = passkey_eval(tiny, path="fast", **kw), passkey_eval(tiny, path="plain", **kw)
    f, p = fast["results"][0], plain["results"][0]
    assert f["samples"] == p["samples"] and f["correct"] == p["correct"]
    for name in ("key_bits_per_digit", "control_bits_per_digit", "forced_digit_accuracy"):
        assert f[name] == pytest.approx(p[name], abs=1e-9)
    tf, tp = (passkey_trace(tiny, 256, seed=5, depth=(0.1, 0.9), filler="source", path=path) for path in
              ("fast", "plain"))
    assert tf["answer"] == tp["answer"] and tf["key_start"] == tp["key_start"]
    assert [w["slots"] for w in tf["written"]] == [w["slots"] for w in tp["written"]]
    assert [q["picked"] for q in tf["question"]] == [q["picked"] for q in tp["question"]]
    assert tf["haystack"]["kind"] == "source" and 0.1 <= tf["key_depth"] <= 0.9


def test_eval_cli_source_haystack_and_its_errors(tiny, tmp_path, capsys):
    tiny.save_pretrained(str(tmp_path / "m"))
    assert main(["eval", "--model", str(tmp_path / "m"), "--passkey", "--lengths", "256", "--trials", "2",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["passkey"]
    assert res["filler"] == "source" and res["depth"] == [0.1, 0.9]             # the defaults
    assert res["haystack"]["dir"] == FROZEN_SOURCE + ".txt.gz"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("def f(x):\n    return x\n" * 50)
    assert main(["eval", "--model", str(tmp_path / "m"), "--passkey", "--lengths", "256", "--trials", "1",
                 "--haystack-dir", str(tmp_path / "src"), "--depth", "0.5", "--trace", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passkey"]["haystack"]["dir"] == str(tmp_path / "src") and out["passkey"]["depth"] == 0.5
    assert out["trace"][0]["haystack"]["dir"] == str(tmp_path / "src")
    assert main(["eval", "--model", str(tmp_path / "m"), "--passkey", "--lengths", "256", "--trials", "1",
                 "--filler", "python", "--depth", "0.5"]) == 0
    assert "python filler, key at depth 0.50" in capsys.readouterr().out
    for args, why in ((["--depth", "0.9:0.1"], "low end"), (["--depth", "2"], "depth = 2"),
                      (["--haystack-dir", str(tmp_path / "nope")], "not a folder"),
                      (["--haystack-dir", str(tmp_path / "src"), "--lengths", "5000"], "too few"),
                      (["--filler", "prose", "--haystack-dir", str(tmp_path / "src")], "--filler source"),
                      (["--lengths", "100"], "too short")):
        assert main(["eval", "--model", str(tmp_path / "m"), "--passkey", *args]) != 0
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and "Traceback" not in err
