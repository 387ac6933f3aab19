"""The command line as a user meets it: help, one-line errors, generate and inspect."""

import json
import subprocess
import sys

import pytest
import torch

from steerport import Steer
from steerport.cli import parse_steer_arg
from tests.tiny import D, random_steer_factors, tiny_model


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


def test_the_command_exits_like_python_without_the_teardown(tmp_path):
    """``run()`` keeps a normal exit's promises: exit handlers, non-daemon threads, flushed output, status."""
    from steerport.cli import _exit_status

    assert (_exit_status(None), _exit_status(0), _exit_status(3)) == (0, 0, 3)
    assert run("no-such-command").returncode == 2  # a usage error keeps click's status
    marker = tmp_path / "marker.txt"
    script = ("import atexit, sys, threading, time, steerport.cli as cli\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'a').write('atexit\\n'))\n"
              f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(marker)!r}, 'a').write('thread\\n'))).start()\n"
              "sys.stdout.write('x' * 200000)\n"  # more than a pipe holds: flushed before the exit
              "sys.argv = ['steerport', 'bogus-command']\n"
              "cli.run()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stdout) == 200000 and "No such command" in r.stderr
    assert marker.read_text() == "thread\natexit\n"


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


# --------------------------------------------------------------------------- start-up cost, the lazy package


def test_importing_the_cli_and_the_package_loads_no_torch():
    code = ("import sys, steerport, steerport.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'rich.table') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_lazy_package_names():
    import steerport

    assert set(steerport.__all__) == {"SteerportError", *steerport._EXPORTS}
    assert set(steerport.__all__) <= set(dir(steerport))
    assert steerport.__version__
    assert steerport.Steer is Steer and steerport.load_model.__module__ == "steerport.models"
    with pytest.raises(AttributeError, match="no_such_name"):
        steerport.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- bad input at the boundary


@pytest.mark.parametrize("arg", ["x.st:nan", "x.st:inf", "x.st:-inf", "x.st:1e999", "x.st:abc", "x.st:"])
def test_steer_value_must_be_a_finite_number(arg):
    from steerport import SteerportError

    with pytest.raises(SteerportError, match="not a finite number"):
        parse_steer_arg(arg)


def main_run(monkeypatch, capsys, *args):
    """Run ``steerport ARGS`` in this process through main(); returns (exit code, stdout, stderr)."""
    from steerport.cli import main

    monkeypatch.setattr("sys.argv", ["steerport", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def files(tmp_path):
    """A steer and an actadd steer made for no particular model, and a file of undecodable bytes."""
    A, B = random_steer_factors(seed=3)
    Steer.lm_steer(A, B, epsilon=1.0).save(tmp_path / "s.st")
    Steer("actadd", {"vector": torch.ones(D)}, meta={"layer": 1, "positions": "all"}).save(tmp_path / "a.st")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine", "label": 1}\n{"text": "caf\xe9 \xff", "label": 0}\n')
    (tmp_path / "bad.txt").write_bytes(b"a line of text that is long enough to be kept as a text\n\xff\xfe\n")
    return tmp_path


@pytest.mark.parametrize("args,fragment", [
    (["export-cvec", "{a}:nan", "--out", "{t}/x.gguf"], "not a finite number"),
    (["generate", "no-such-model", "-p", "hi", "--steer", "{s}:inf"], "not a finite number"),
    (["score", "no-such-model", "--steer", "{s}:nan", "--data", "{t}/bad.jsonl"], "not a finite number"),
    (["generate", "no-such-model", "-p", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "no-such-model", "-p", "hi", "--top-p", "inf"], "--top-p must be"),
    (["inspect", "{s}", "--model", "no-such-model", "--value", "nan"], "--value must be a finite number"),
    (["token-steer", "no-such-model", "--token", "a", "--scale", "inf", "--out", "{t}/y.st"], "--scale must be"),
    (["actadd", "no-such-model", "--plus", "a", "--minus", "b", "--coeff", "nan", "--out", "{t}/y.st"], "--coeff must be"),
    (["transfer", "a", "b", "--steer", "{s}", "--calib-value", "inf"], "--calib-value must be"),
    (["transfer", "a", "b", "--steer", "{s}", "--keywords", "-1"], "--keywords must be at least 0"),
    (["map", "a", "b", "--ridge", "nan"], "--ridge must be"),
    (["train", "no-such-model", "--data", "sst2", "--out", "{t}/z.st", "--lr", "nan"], "--lr must be"),
    (["sweep", "no-such-model", "--steer", "{s}", "--prompts", "{t}/missing.txt"], "no such prompts file"),
    (["transfer", "a", "b", "--steer", "{t}/missing.st"], "no such steer file"),
])
def test_non_finite_numbers_and_missing_files_are_refused_first(files, monkeypatch, capsys, args, fragment):
    args = [a.format(s=files / "s.st", a=files / "a.st", t=files) for a in args]
    code, _, err = main_run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert not (files / "x.gguf").exists()


@pytest.mark.parametrize("args", [
    ["generate", "no-such-model", "--prompts", "{t}/bad.jsonl"],
    ["generate", "no-such-model", "--prompts", "{t}/bad.txt"],
    ["inspect", "{s}", "--model", "no-such-model", "--neutral", "{t}/bad.txt"],
    ["score", "no-such-model", "--steer", "{s}", "--data", "{t}/bad.jsonl"],
    ["sweep", "no-such-model", "--steer", "{s}", "--data", "{t}/bad.jsonl"],
    ["sweep", "no-such-model", "--steer", "{s}", "--neutral", "{t}/bad.txt"],
    ["evaluate", "no-such-model", "--steer", "{s}", "--data", "{t}/bad.jsonl"],
    ["evaluate", "no-such-model", "--steer", "{s}", "--data", "{t}/ok.jsonl", "--reference-text", "{t}/bad.txt"],
    ["explain", "no-such-model", "--steer", "{s}", "--file", "{t}/bad.txt"],
    ["analyze", "no-such-model", "--text", "{t}/bad.txt"],
    ["token-steer", "no-such-model", "--token", "a", "--scale", "2", "--detect", "{t}/bad.txt", "--out", "{t}/y.st"],
    ["transfer", "a", "b", "--steer", "{s}", "--calib-text", "{t}/bad.txt"],
    ["transfer", "a", "b", "--steer", "{s}", "--hidden-text", "{t}/bad.txt"],
    ["actadd-transfer", "a", "b", "--steer", "{a}", "--neutral", "{t}/bad.txt", "--out", "{t}/y.st"],
    ["token-transfer", "b", "--steer", "{s}", "--detect", "{t}/bad.txt", "--out", "{t}/y.st"],
    ["train", "no-such-model", "--positive", "{t}/bad.txt", "--negative", "{t}/bad.txt", "--out", "{t}/z.st"],
])
def test_undecodable_data_files_are_one_line_errors(files, monkeypatch, capsys, args):
    (files / "ok.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    args = [a.format(s=files / "s.st", a=files / "a.st", t=files) for a in args]
    code, _, err = main_run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "bad.", "not UTF-8")


def test_user_strings_are_printed_verbatim(tmp_path, monkeypatch, capsys):
    """No rich markup or emoji codes in what the user typed: a path comes back exactly."""
    odd = tmp_path / "[bold]runs:smile:[/]" / "x[red].st"
    code, _, err = main_run(monkeypatch, capsys, "inspect", odd)
    assert_one_line_error(code, err, str(odd), "no such steer file")
    odd.parent.mkdir(parents=True)
    A, B = random_steer_factors(seed=3)
    Steer.lm_steer(A, B, epsilon=1.0, positive="[green]nice :thumbs_up:").save(odd)
    code, out, err = main_run(monkeypatch, capsys, "inspect", odd)
    assert code == 0, err
    assert "[green]nice :thumbs_up:" in out and "x[red].st" in out


# --------------------------------------------------------------------------- output for scripts


def test_generate_jsonl_is_one_object_per_line_and_no_bar_off_a_terminal(tiny_dir):
    r = run("generate", str(tiny_dir), "-p", "The [bold]movie:smile:", "-p", "I think", "--max-new-tokens", "3",
            "--jsonl", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == ["The [bold]movie:smile:", "I think"]
    assert "generating" not in r.stderr  # the progress display is drawn only on a terminal
    plain = run("generate", str(tiny_dir), "-p", "The [bold]movie:smile:", "--max-new-tokens", "3", "--dtype", "float32")
    assert plain.stdout.startswith("The [bold]movie:smile:")


# --------------------------------------------------------------------------- transfer: one library call for every kind


class _Recorder:
    """Stands in for steerport.transfer: records each transfer_steer call and returns a result."""

    def __init__(self):
        self.calls = []

    def options(self, **kw):
        return dict(kw)

    def transfer_steer(self, steer, source, target, options=None, **kw):
        from types import SimpleNamespace

        self.calls.append({"kind": steer.kind, "source": source, "target": target, "options": options, **kw})
        lineage = {"method": "recorded", "dropped": []}
        return SimpleNamespace(steer=steer, mapping=None, lineage=lineage)


@pytest.fixture
def recorder(monkeypatch):
    import steerport.transfer

    rec = _Recorder()
    monkeypatch.setattr(steerport.transfer, "transfer_steer", rec.transfer_steer, raising=False)
    monkeypatch.setattr(steerport.transfer, "TransferOptions", rec.options)
    return rec


def test_transfer_and_its_aliases_make_the_same_library_call(files, recorder, monkeypatch, capsys):
    act = Steer("actadd", {"vector": torch.ones(D)}, model={"spec": "src-model", "fingerprint": "f"},
                meta={"layer": 1, "n_layers": 2, "positions": "all"})
    act.save(files / "act.st")
    tok = Steer("token-prob", {"token_ids": torch.tensor([3]), "delta": torch.ones(1, D)},
                model={"spec": "src-model", "fingerprint": "f"},
                meta={"tokens": ["a"], "scales": [2.0], "regression": {"adj_r2": 0.5}})
    tok.save(files / "tok.st")
    text = files / "neutral.txt"
    lines = [f"neutral paragraph number {i} with enough characters to be kept" for i in range(3)]
    text.write_text("\n".join(lines) + "\n")
    assert main_run(monkeypatch, capsys, "transfer", "src-model", "tgt", "--steer", files / "act.st",
                    "--actadd-method", "map", "--calib-text", text, "--out", files / "o1.st")[0] == 0
    assert main_run(monkeypatch, capsys, "actadd-transfer", "src-model", "tgt", "--steer", files / "act.st",
                    "--method", "map", "--neutral", text, "--lines", "2", "--out", files / "o2.st")[0] == 0
    assert main_run(monkeypatch, capsys, "token-transfer", "tgt", "--steer", files / "tok.st", "--detect", text,
                    "--out", files / "o3.st")[0] == 0
    c1, c2, c3 = recorder.calls
    assert (c1["kind"], c1["source"], c1["target"]) == ("actadd", "src-model", "tgt")
    assert c1["options"]["actadd_method"] == c2["options"]["actadd_method"] == "map"
    assert c1["options"]["texts"] == c1["options"]["calib_texts"] == lines
    assert c1["source_path"] == str(files / "act.st") and c1["force"] is False
    assert c2["options"]["texts"] == lines[:2] and c2["options"]["calibrate"] == "none"
    assert (c3["kind"], c3["source"], c3["target"]) == ("token-prob", "src-model", "tgt")
    assert c3["options"]["texts"] == lines and c3["options"]["max_tokens"] == 128
    assert Steer.load(files / "o3.st").kind == "token-prob"


# --------------------------------------------------------------------------- optional command groups


def test_optional_command_groups_register_when_present(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import steerport.cli as cli

    pkg = tmp_path / "extra_cmds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hello.py").write_text(
        "def register(app):\n"
        "    @app.command('hello')\n"
        "    def hello():\n"
        "        print('hello from an optional group')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "OPTIONAL_GROUPS", ("extra_cmds.hello", "extra_cmds.absent", "no_such_pkg.cmd"))
    app = typer.Typer()
    cli.register_groups(app)
    r = CliRunner().invoke(app, ["hello"])
    assert r.exit_code == 0 and "hello from an optional group" in r.output
    assert CliRunner().invoke(app, ["inspect", "--help"]).exit_code == 0


def test_a_steer_whose_header_length_looks_like_a_pickle_magic_loads(tmp_path, monkeypatch, capsys):
    """A safetensors header of 1408 bytes starts the file with 80 05 (pickle protocol 5's magic)."""
    A, B = random_steer_factors(seed=3)
    path = tmp_path / "s.st"
    for pad in range(1200):
        Steer.lm_steer(A, B, epsilon=1.0, positive="x" * pad).save(path)
        if path.read_bytes()[:2] == b"\x80\x05":
            break
    assert path.read_bytes()[:2] == b"\x80\x05"
    code, out, err = main_run(monkeypatch, capsys, "inspect", path, "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "lm-steer"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("args", [
    ["generate", "smollm2-135m", "--prompt", "hi", "--device", "cuda"],
    ["train", "smollm2-135m", "--data", "sst2", "--out", "never-written.st", "--device", "cuda"],
])
def test_device_cuda_without_cuda_is_one_line(args):
    r = run(*args)
    assert r.returncode == 1
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: --device cuda: CUDA is not available"), err


def test_missing_required_option_is_a_usage_message_not_a_traceback():
    r = run("train", "smollm2-135m", "--data", "sst2")
    assert r.returncode == 2
    assert "Missing option" in r.stderr and "Traceback" not in r.stderr, r.stderr
