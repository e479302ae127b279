"""Documented command outputs still hold: each transcript block of README.md and docs/*.md that carries a
``<!-- check: ... -->`` comment is rerun and compared with what the page shows, figure by figure.

A transcript is a fenced ``text`` block whose ``$ `` lines are shell commands (``thl-np`` runs this checkout's
package, ``python`` this interpreter) and whose other lines are the output the page promises. The page may
leave lines out (each shown line must appear, in order); on a shown line the words must be the same and
each number within the block's tolerance:

    <!-- check: rtol=0.01 atol=0.001 itol=0 expensive python=3.11 timeout=300 -->

- ``rtol``/``atol``: numbers written with a decimal point or an exponent (default 0: as printed);
- ``itol``: whole numbers, absolute (default 0: exact; counts, slot numbers, steps);
- ``expensive``: a rerun of minutes; runs only with THL_DOC_RERUN=all (the suite stays near 5 minutes);
- ``python=X.Y``: the figures depend on that Python's standard library (the data); skipped on another;
- ``timeout``: seconds (default 180);
- ``ignore=REGEX``: what matches is left out of the comparison on both sides (a machine's memory use).

A transcript block without a check comment must say why: ``<!-- check: no (reason) -->``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*check:(?P<opts>[^>]*)-->\s*\n)?(?P<indent>[ \t]*)```text\n(?P<body>.*?)```", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
RUN_EXPENSIVE = os.environ.get("THL_DOC_RERUN") == "all"


def transcripts():
    """(page, line, options or None, commands, expected lines) of every transcript block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            lines = [line[len(m["indent"]):] if line.startswith(m["indent"]) else line
                     for line in m["body"].rstrip().split("\n")]
            if not lines or not lines[0].startswith("$ "):
                continue
            commands, expected, continued = [], [], False
            for line in lines:
                if line.startswith("$ ") or continued:
                    commands.append(line[2:] if line.startswith("$ ") and not continued else line)
                    continued = line.endswith("\\")
                else:
                    expected.append(line)
            where = f"{page.name}:{text.count(chr(10), 0, m.start('body'))}"
            found.append((where, m["opts"], "\n".join(commands), expected))
    return found


def parse_options(opts: str) -> dict:
    out = {"rtol": 0.0, "atol": 0.0, "itol": 0.0, "expensive": False, "python": None, "timeout": 180.0,
           "ignore": None}
    for word in opts.split():
        key, _, value = word.partition("=")
        if key == "expensive":
            out["expensive"] = True
        elif key == "python":
            out["python"] = value
        elif key == "ignore":
            out["ignore"] = re.compile(value)
        elif key in out:
            out[key] = float(value)
        else:
            raise ValueError(f"unknown check option {word!r}")
    return out


def split_figures(line: str):
    """(the words with every number replaced by '#', the numbers as written)."""
    line = " ".join(line.split())
    return NUMBER.sub("#", line), NUMBER.findall(line)


def same_line(shown: str, got: str, o: dict) -> bool:
    if o["ignore"] is not None:
        shown, got = o["ignore"].sub("~", shown), o["ignore"].sub("~", got)
    words_a, nums_a = split_figures(shown)
    words_b, nums_b = split_figures(got)
    if words_a != words_b:
        return False
    for a, b in zip(nums_a, nums_b, strict=True):
        whole = not re.search(r"[.eE]", a)
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        if abs(x - y) > (o["itol"] if whole else o["atol"] + o["rtol"] * abs(x)):
            return False
    return True


_OUTPUTS: dict = {}


def run_commands(commands: str, timeout: float, tmp_path) -> str:
    """stdout of the block's commands in bash, in an empty folder (a plot path like docs/x.png lands there)."""
    if commands in _OUTPUTS:
        return _OUTPUTS[commands]
    (tmp_path / "docs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "THL_PY": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    script = 'set -eo pipefail\nthl-np() { "$THL_PY" -m thl_np "$@"; }\n' + commands + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"the documented commands failed:\n{commands}\n{proc.stderr[-2000:]}"
    _OUTPUTS[commands] = proc.stdout
    return proc.stdout


BLOCKS = transcripts()


def test_every_transcript_is_checked_or_says_why():
    unmarked = [where for where, opts, _, _ in BLOCKS if opts is None]
    assert not unmarked, f"transcripts without a <!-- check: ... --> comment: {unmarked}"
    assert sum(1 for _, opts, _, _ in BLOCKS if opts and not opts.strip().startswith("no")) >= 3


@pytest.mark.parametrize("where, opts, commands, expected",
                         [b for b in BLOCKS if b[1] is not None and not b[1].strip().startswith("no")],
                         ids=[b[0] for b in BLOCKS if b[1] is not None and not b[1].strip().startswith("no")])
def test_documented_output_holds(where, opts, commands, expected, tmp_path):
    o = parse_options(opts)
    if o["expensive"] and not RUN_EXPENSIVE:
        pytest.skip("an expensive rerun: THL_DOC_RERUN=all runs it")
    if o["python"] and o["python"] != "{}.{}".format(*sys.version_info[:2]):
        pytest.skip(f"figures of Python {o['python']}'s standard library")
    got = run_commands(commands, o["timeout"], tmp_path).splitlines()
    i = 0
    for line in expected:
        j = next((k for k in range(i, len(got)) if same_line(line, got[k], o)), None)
        if j is None:
            near = [g for g in got[i:] if split_figures(g)[0] == split_figures(line)[0]][:1]
            raise AssertionError(f"{where}: the documented line\n  {line}\nis no longer printed"
                                 + (f"; now:\n  {near[0]}" if near else "") + f"\n(command: {commands})")
        i = j + 1


@pytest.mark.parametrize("shown, got, opts, ok", [
    ("digits 7@2484->17, 25 of 44", "digits 7@2484->17, 25 of 44", "", True),
    ("digits 7@2484->17, 25 of 44", "digits 7@2517->15, 28 of 44", "", False),
    ("entropy 1.386 nats", "entropy 1.390 nats", "rtol=0.01", True),
    ("entropy 1.386 nats", "entropy 1.500 nats", "rtol=0.01", False),
    ("49 empty", "50 empty", "itol=1", True),
    ("49 empty", "51 empty", "itol=1", False),
    ("answer '76372' (right)", "answer '76327' (wrong)", "itol=1000000", False),
    ("4096  1.00  0.14  177.7 MiB  67.0 KiB", "4096  0.98  0.15  203.1 MiB  67.0 KiB",
     r"atol=0.06 ignore=[\d.]+\sMiB", True),
    ("4096  1.00  0.14  177.7 MiB  67.0 KiB", "4096  0.90  0.14  177.7 MiB  67.0 KiB",
     r"atol=0.06 ignore=[\d.]+\sMiB", False),
    ("65536  1.00  1.00  0.65", "65536  0.90  0.98  0.70", "atol=0.11 rtol=0.05", True),   # a trial in ten
    ("65536  1.00  1.00  0.65", "65536  0.80  0.96  0.70", "atol=0.11 rtol=0.05", False),  # two
])
def test_the_comparison_itself(shown, got, opts, ok):
    assert same_line(shown, got, parse_options(opts)) is ok
