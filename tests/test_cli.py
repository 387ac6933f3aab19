"""The command line as a user meets it: help, one-line errors, generate and inspect."""

import json
import subprocess
import sys

import pytest

from steerport import Steer
from steerport.cli import parse_steer_arg
from tests.tiny import random_steer_factors, tiny_model


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "steerport.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_parse_steer_arg():
    assert parse_steer_arg("toxic.st:-5") == (parse_steer_arg("toxic.st")[0], -5.0)
    assert parse_steer_arg("toxic.st")[1] == 1.0
    assert parse_steer_arg("dir:with:colons/a.st:2.5")[1] == 2.5


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("models", "pull", "generate", "inspect"):
        assert cmd in r.stdout


@pytest.mark.parametrize("args,fragment", [
    (["generate", "no-such-model", "--prompt", "hi"], "unknown model"),
    (["inspect", "missing.st"], "no such steer file"),
    (["pull", "not-in-catalog"], "not-in-catalog"),
])
def test_bad_input_is_one_line_and_nonzero(args, fragment):
    r = run(*args)
    assert r.returncode == 1
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    lm = tiny_model("gpt2")
    path = tmp_path_factory.mktemp("m") / "tiny-gpt2"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    A, B = random_steer_factors(seed=3)
    steer = Steer.lm_steer(A, B, epsilon=40.0, positive="test", model={"spec": str(path), "fingerprint": lm.fingerprint})
    steer.save(path.parent / "s.st")
    return path


def test_generate_and_inspect_on_a_local_model(tiny_dir):
    st = tiny_dir.parent / "s.st"
    base = run("generate", str(tiny_dir), "-p", "The movie was", "--max-new-tokens", "6", "--jsonl", "--dtype", "float32")
    assert base.returncode == 0, base.stderr
    zero = run("generate", str(tiny_dir), "-p", "The movie was", "--max-new-tokens", "6", "--jsonl",
               "--dtype", "float32", "--steer", f"{st}:0")
    steered = run("generate", str(tiny_dir), "-p", "The movie was", "--max-new-tokens", "6", "--jsonl",
                  "--dtype", "float32", "--steer", f"{st}:1")
    cont = lambda r: json.loads(r.stdout)["continuation"]
    assert cont(zero) == cont(base)
    assert cont(steered) != cont(base)
    info = run("inspect", str(st), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["kind"] == "lm-steer"


def test_mismatched_steer_refused_on_cli(tiny_dir, tmp_path):
    A, B = random_steer_factors(seed=3)
    Steer.lm_steer(A, B, epsilon=1.0, model={"spec": "other", "fingerprint": "feedbeef"}).save(tmp_path / "o.st")
    r = run("generate", str(tiny_dir), "-p", "x", "--steer", str(tmp_path / "o.st"))
    assert r.returncode == 1 and "fingerprint" in r.stderr and "--force" in r.stderr
