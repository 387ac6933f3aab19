"""Data-parallel training (steerport.distributed): real launches of 2 CPU processes (gloo) on a tiny
model give the steer of one process tensor for tensor; a world larger than the data and a rank
killed mid-pass are one line, and the rerun resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from steerport.capture import batch_plan
from steerport.data import Dataset, Example
from steerport.distributed import World, check_size, current_world, deal, rank_device
from steerport.errors import SteerportError
from steerport.steer import Steer
from steerport.train import TrainConfig, train
from tests.tiny import CORPUS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
N_TEXTS = 200  # 4 forward-pass batches at the default cache batch size: 2 per rank


def texts(n: int = N_TEXTS) -> list[str]:
    return [CORPUS[i % 6] + " " + " ".join(CORPUS[(i * 7 + 3) % 6].split()[: i % 5 + 1]) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model saved to a folder and a labeled JSONL file of N_TEXTS texts."""
    root = tmp_path_factory.mktemp("dp")
    lm = tiny_model("llama", tied=False)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as f:
        for i, t in enumerate(texts()):
            f.write(json.dumps({"text": t, "label": i % 2}) + "\n")
    return root


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}  # launchers set 1 thread per process
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if k not in env:
            full.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)


def train_cli(setup: Path, out: str) -> list[str]:
    return ["-m", "steerport.cli", "train", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--positive-label", "1",
            "--out", str(setup / out), "--steps", "6", "--dtype", "float32", "--keep-cache"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_same_steer(a: Path, b: Path) -> None:
    sa, sb = Steer.load(a), Steer.load(b)
    assert sa.tensors.keys() == sb.tensors.keys()
    for k in sa.tensors:
        assert torch.equal(sa.tensors[k], sb.tensors[k]), k
    assert sa.epsilon == sb.epsilon


# --------------------------------------------------------------------------- pieces


def test_deal_gives_every_batch_to_exactly_one_rank():
    lists = [list(range(n)) for n in [5, 3, 9, 2, 7, 7, 4, 1, 6]]
    plan = batch_plan(lists, 12)
    assert len(plan) >= 4
    for size in (1, 2, 3, len(plan) + 2):
        seen: list[int] = []
        for rank in range(size):
            mine, batches = deal(plan, rank, size)
            assert [mine[j] for b in batches for row in b for j in row] == mine  # local rows index the rank's texts in order
            assert [[[mine[j] for j in row] for row in b] for b in batches] == plan[rank::size]  # the batches of one process
            seen += mine
        assert sorted(seen) == list(range(len(lists)))


def test_world_read_from_the_launcher_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert current_world() == World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = current_world()
    assert world == World(3, 4, 1) and not world.is_main
    assert rank_device(world, "cuda") == "cuda:1" and rank_device(world, "cpu") == "cpu"
    assert rank_device(World(), "cuda") == "cuda"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(SteerportError, match="rank 4 in a world of 4"):
        current_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(SteerportError, match="bad launcher environment"):
        current_world()


def test_world_larger_than_the_texts_is_refused_before_any_work(monkeypatch, tmp_path):
    check_size(World(0, 3), 3)
    with pytest.raises(SteerportError, match="4 processes for 3 texts"):
        check_size(World(1, 4), 3)
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    lm = tiny_model("llama")
    ex = [Example(t, 1.0 if i % 2 else -1.0, f"m:{i}") for i, t in enumerate(CORPUS[:4])]
    with pytest.raises(SteerportError, match="5 processes for 4 texts: launch at most 4"):
        train(lm, Dataset(ex[1:], ex[:1], "positive", {"counts": {}}), TrainConfig(steps=1), workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()  # refused before the work folder is touched


def test_cli_world_larger_than_the_texts_is_one_line(setup, tmp_path, monkeypatch, capsys):
    from tests.test_cli import assert_one_line_error, main_run

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(CORPUS[:4])))
    for k, v in {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    code, _, err = main_run(monkeypatch, capsys, "train", setup / "model", "--data", few, "--positive-label", "1",
                            "--heldout", "0.25", "--out", tmp_path / "x.st")
    err = "\n".join(line for line in err.splitlines() if not line.startswith("data: "))  # rank 0's data summary
    assert_one_line_error(code, err, "8 processes for 4 texts: launch at most 4 processes (or give more texts)")


# --------------------------------------------------------------------------- real launches


def test_two_processes_train_the_identical_steer(setup):
    """accelerate launch, 2 CPU processes over gloo: the same cache bytes and the same steer as one process."""
    one = run([sys.executable, *train_cli(setup, "one.st")])
    assert one.returncode == 0, one.stderr[-2000:]
    # accelerate's --cpu runs a single process; --multi_gpu is its torchrun launcher, which works on CPUs too
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *train_cli(setup, "two.st")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel: 2 processes share the body pass" in two.stderr
    assert two.stderr.count("data: train 90 positive") == 1  # rank 0 speaks alone
    assert_same_steer(setup / "one.st", setup / "two.st")
    hidden = [(setup / f"{n}.st.work" / "hidden.bin").read_bytes() for n in ("one", "two")]
    assert len(hidden[0]) > 0 and hidden[0] == hidden[1]
    assert not list((setup / "two.st.work").glob("shard-*"))  # gathered and removed


WORKER = textwrap.dedent('''
    """Train on the tiny model under torchrun; rank 1 kills itself (SIGKILL) after DIE forward passes."""
    import json, os, signal, sys
    from pathlib import Path
    import steerport.capture as capture
    from steerport.data import Dataset, Example
    from steerport.errors import SteerportError
    from steerport.models import load_model
    from steerport.train import TrainConfig, train

    model, data, wd, out, die = sys.argv[1:6]
    rank = os.environ.get("RANK", "0")
    calls = [0]
    real = capture.capture

    def counted(*args, **kwargs):
        calls[0] += 1
        if rank == "1" and int(die) and calls[0] > int(die):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    capture.capture = counted
    rows = [json.loads(line) for line in open(data)]
    ex = [Example(r["text"], 1.0 if r["label"] else -1.0, f"m:{i}") for i, r in enumerate(rows)]
    try:
        result = train(load_model(model), Dataset(ex[20:], ex[:20], "positive", {"counts": {}}),
                       TrainConfig(rank=2, steps=6, dtype="float32", cache_tokens_per_batch=160), workdir=Path(wd))
    except SteerportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        sys.exit(130)
    finally:
        Path(wd, f"calls-{rank}.json").write_text(json.dumps(calls[0]))
    if rank == "0":
        result.steer.save(out)
''')


def test_killed_rank_fails_cleanly_and_the_rerun_resumes(setup, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [str(setup / "model"), str(setup / "data.jsonl")]
    alone = run([sys.executable, str(worker), *args, str(tmp_path / "alone.work"), str(tmp_path / "alone.st"), "0"])
    assert alone.returncode == 0, alone.stderr[-2000:]
    n_passes = json.loads((tmp_path / "alone.work" / "calls-0.json").read_text())
    n_batches = json.loads((tmp_path / "alone.work" / "hidden.json").read_text())["batches"]
    assert n_batches >= 12  # many batches, so the kill lands mid-pass
    other = n_passes - n_batches  # forward passes that are not batches of the body pass (the packing and head checks)

    wd, logs = tmp_path / "dp.work", tmp_path / "logs"

    def launch(die: int, log_dir: Path) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
                    str(log_dir), "--redirects", "3", str(worker), *args, str(wd), str(tmp_path / "dp.st"), str(die)])

    died = launch(other + 3, logs)  # rank 1 dies after its third batch
    assert died.returncode != 0 and not (tmp_path / "dp.st").exists()
    rank0 = next(logs.rglob("0/stderr.log")).read_text()
    assert "Traceback" not in rank0
    last = rank0.strip().splitlines()[-1]  # rank 0 was told to stop (SIGTERM) or saw its peer vanish: one line either way
    assert last == "stopped" or (last.startswith("error: rank 0 of 2: another process of this data-parallel run stopped")
                                 and "run the same command again to resume" in last), rank0[-2000:]
    kept = json.loads((wd / "shard-1-of-2" / "hidden.json").read_text())
    assert 1 <= kept["batches_done"] < kept["batches"]  # died mid-pass; what it finished is on disk

    again = launch(0, tmp_path / "logs2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_steer(tmp_path / "alone.st", tmp_path / "dp.st")
    redone = json.loads((wd / "calls-1.json").read_text())
    assert redone == other + kept["batches"] - kept["batches_done"]  # rank 1 resumed: only its unfinished batches
