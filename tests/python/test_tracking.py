"""`--report-to tensorboard`: our event files read by the real TensorBoard from PyPI (in
a venv of its own: tests/python/tracking-requirements.txt). Its strict record reader
checks every CRC, EventAccumulator reads our scalars under HF Trainer's names and the
run's configuration, a resumed run's new session drops the steps the first session
wrote past its checkpoint, `runs export-metrics` writes the same as one session, and
`tensorboard` itself serves the scalars over HTTP."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import SAMPLES

TB_VENV = pathlib.Path(os.environ.get("BACKPROP_TRACKING_VENV", "/nonexistent"))
TB_PY = TB_VENV / "bin" / "python"
pytestmark = pytest.mark.skipif(not TB_PY.is_file(), reason="scripts/test.sh installs the tracking venv")

READ = r"""
import json, pathlib, sys
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

logdir = pathlib.Path(sys.argv[1])
files = []
for path in sorted(logdir.glob("events.out.tfevents.*")):
    reader = PyRecordReader_New(str(path))
    events = []
    while True:
        try:
            reader.GetNext()  # raises DataLossError on any bad CRC
        except errors.OutOfRangeError:
            break
        e = event_pb2.Event.FromString(reader.record())
        events.append({"what": e.WhichOneof("what"), "step": e.step,
                       "status": e.session_log.status if e.HasField("session_log") else None})
    files.append({"name": path.name, "events": events})
acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
scalars = {t: [[s.step, s.value] for s in acc.Scalars(t)] for t in tags["scalars"]}
config = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("config")] if "config" in tags["tensors"] else []
print(json.dumps({"files": files, "scalars": scalars, "config": config}))
"""


def read_with_tensorboard(logdir):
    out = subprocess.run([str(TB_PY), "-c", READ, str(logdir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def metric_steps(run, key):
    last = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if key in m:
            last[m["step"]] = m[key]
    return last


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_reads_a_resumed_run_and_serves_it(backprop, tmp_path):
    model = tmp_path / "model"
    backprop("fixture", model)
    runs = tmp_path / "runs"
    backprop("train", "--model", model, "--data", SAMPLES / "alpaca.jsonl", "--steps", "6",
             "--batch-size", "2", "--checkpoint-every", "2", "--val-ratio", "0.1", "--eval-every", "3",
             "--report-to", "tensorboard", "--runs-dir", runs)
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    # A crash after step 6's metrics but before its checkpoint: resumed from step 4,
    # steps 5 and 6 are trained and reported again.
    shutil.rmtree(run / "checkpoints" / "step-6")
    backprop("train", "--resume", run.name, "--runs-dir", runs)

    got = read_with_tensorboard(run / "tensorboard")
    first, second = got["files"]
    assert first["events"][0]["what"] == "file_version"
    assert first["events"][1] == {"what": "session_log", "step": 1, "status": 1}  # START
    assert [e["step"] for e in first["events"] if e["what"] == "summary"][-1] == 6
    assert second["events"][0]["what"] == "file_version"
    assert second["events"][1] == {"what": "session_log", "step": 5, "status": 1}  # START
    losses = metric_steps(run, "loss")
    assert [s for s, _ in got["scalars"]["train/loss"]] == [1, 2, 3, 4, 5, 6], "orphaned steps dropped"
    for step, value in got["scalars"]["train/loss"]:
        assert abs(value - losses[step]) <= 1e-6 * abs(losses[step]), (step, value, losses[step])
    assert [s for s, _ in got["scalars"]["eval/loss"]] == [3, 6]
    for tag in ["train/learning_rate", "train/grad_norm", "train/tokens_per_second"]:
        assert [s for s, _ in got["scalars"][tag]] == [1, 2, 3, 4, 5, 6], tag
    assert any("steps = 6" in c for c in got["config"]), got["config"]

    # The same metrics as one clean session.
    exported = pathlib.Path(backprop("runs", "export-metrics", run.name, "--to", "tensorboard",
                                     "--runs-dir", runs).stdout.strip())
    again = read_with_tensorboard(exported)
    assert len(again["files"]) == 1
    assert again["scalars"]["train/loss"] == got["scalars"]["train/loss"]
    assert again["scalars"]["eval/loss"] == got["scalars"]["eval/loss"]

    # TensorBoard's own server (the Python data path, not the Rust data server).
    port = free_port()
    server = subprocess.Popen([str(TB_VENV / "bin" / "tensorboard"), "--logdir", str(run / "tensorboard"),
                               "--load_fast=false", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=train%2Floss"
        deadline = time.time() + 90
        body = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
                if body:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert body, "tensorboard did not serve the scalars"
        assert [step for _, step, _ in body] == [1, 2, 3, 4, 5, 6]
    finally:
        server.terminate()
        server.wait(timeout=30)


def leet(*args):
    out = subprocess.run([str(TB_VENV / "bin" / "wandb"), "leet", "inspect", *map(str, args)],
                         capture_output=True, text=True, env=dict(os.environ, WANDB_SILENT="true"))
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr[-3000:]
    return out.stdout


def test_wandb_reads_our_offline_runs_of_a_resumed_run(backprop, tmp_path):
    """`--report-to wandb`: an offline run per session that W&B's own reader (`wandb
    leet inspect`) takes record by record with nothing on stderr: long enough to span
    several 32 KiB blocks, the config, every step's history, the summary and a clean
    exit; the resumed session is the same W&B run."""
    model = tmp_path / "model"
    backprop("fixture", model)
    runs = tmp_path / "runs"
    backprop("train", "--model", model, "--data", SAMPLES / "alpaca.jsonl", "--steps", "300",
             "--batch-size", "2", "--max-seq-len", "64", "--checkpoint-every", "100",
             "--report-to", "wandb", "--runs-dir", runs)
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    shutil.rmtree(run / "checkpoints" / "step-300")
    time.sleep(1.1)  # a new offline folder per session, named by the second
    backprop("train", "--resume", run.name, "--runs-dir", runs)

    first, second = sorted((run / "wandb").glob("offline-run-*"))
    assert first.name.split("-")[-1] == second.name.split("-")[-1], "one W&B run id"
    losses = metric_steps(run, "loss")
    for folder, steps in [(first, range(1, 301)), (second, range(201, 301))]:
        (log,) = folder.glob("run-*.wandb")
        records = [json.loads(line) for line in leet("--json", log).splitlines()]
        kinds = [r["type"] for r in records]
        assert kinds[0] == "run" and kinds[-1] == "exit" and kinds[-2] == "summary", kinds[:3] + kinds[-3:]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert [h["_step"] for h in history] == list(steps)
        for h in history:
            assert abs(h["train/loss"] - losses[h["_step"]]) <= 1e-9 * abs(losses[h["_step"]])
        assert records[-1]["exit"]["exit_code"] == 0
    assert next(first.glob("run-*.wandb")).stat().st_size > 2 * 32 * 1024, "spans blocks"
    summary = json.loads(leet("--summary", "--json", second))
    assert summary["exit_code"] == 0 and summary["config"]["steps"] == 300, summary
    assert summary["project"] == "backpropagate" and summary["name"] == run.name

    # The metrics as one offline run, from metrics.jsonl.
    exported = pathlib.Path(backprop("runs", "export-metrics", run.name, "--to", "wandb",
                                     "--runs-dir", runs).stdout.strip())
    (folder,) = exported.glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    records = [json.loads(line) for line in leet("--json", log).splitlines()]
    assert [r["history"]["item"]["_step"] for r in records if r["type"] == "history"] == list(range(1, 301))
