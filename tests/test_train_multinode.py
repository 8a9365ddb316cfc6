"""Two "machines" on one box: the README's multi-node commands (configs/accelerate/multinode_ddp.yaml and
multinode_fsdp.yaml, `--machine_rank 0/1 --main_process_ip 127.0.0.1`), two CPU processes each (gloo), every machine
with its own working folder and TMPDIR (node-local scratch) and the run folder and cache shared:

    ddp       the whole job (check-data, caching split over the 4 processes, training); machine 1 is killed with
              SIGKILL after the step-2 checkpoint: machine 0's processes must exit on their own, soon, naming the lost
              ranks. Both machines relaunched (node-local scratch wiped) resume from the checkpoint, finish and export
    fsdp      the same job sharded (FSDP2) over the 4 processes of the two machines, straight through
    ref_*     both again as one machine with 4 processes (the reference): the two-machine adapters must equal them

One launch per phase (four), all sharing one cache: about 2.5 min on a busy 2-core box, most of it each process
importing torch, transformers, diffusers and peft. Also: the one-machine launch is refused the two-machine checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS = 8
PEER_TIMEOUT = 8  # KREA2_PEER_TIMEOUT for the test (default 120 s)

REFERENCE = textwrap.dedent('''
    import sys
    from krea2_train import pipeline
    from krea2_train.cli import setup_logging
    from krea2_train.config import load_config
    from krea2_train.data.source import CachedData
    from krea2_train.train.trainer import Trainer
    from krea2_train.errors import UserError
    setup_logging()
    pipeline.init_distributed()
    try:  # the two-machine checkpoint on one machine: refused before any model is loaded
        Trainer(load_config(sys.argv[1], ["run_name=refused", f"checkpoint.resume={sys.argv[2]}"])).run()
        raise AssertionError("a two-machine checkpoint resumed on one machine")
    except UserError as e:
        assert "was written on 2 machine(s) (4 processes); this launch has 1 machine(s) (4 processes)" in str(e), e
    for name, extra in (("ref_ddp", []), ("ref_fsdp", ["train.fsdp=true"])):
        cfg = load_config(sys.argv[1], [f"run_name={name}", *extra])
        manifest = pipeline.cache(cfg, pipeline.check_data(cfg))
        t = Trainer(cfg)
        t.source = CachedData(cfg, t.acc, manifest=manifest)
        assert t.run().step == cfg.total_steps and t.acc.num_processes == 4
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machines:
    """Launches the same command as each machine would, and never leaves a process behind."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
                    "KREA2_PEER_TIMEOUT": str(PEER_TIMEOUT), "PYTHONUNBUFFERED": "1",
                    "KREA2_TEST_MACHINES": str(root)}

    def node_dir(self, rank: int, fresh: bool = False) -> Path:
        """Machine `rank`'s own folder (its working directory) with its TMPDIR inside."""
        d = self.root / f"machine{rank}"
        if fresh:
            shutil.rmtree(d, ignore_errors=True)
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        return d

    def launch(self, name: str, args: list, machines=(0, 1), fresh_scratch: bool = False) -> list:
        port, started = _free_port(), []
        for rank in machines:
            d = self.node_dir(rank, fresh=fresh_scratch)
            node = ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"] if len(machines) > 1 else []
            cmd = [str(ACCELERATE), "launch", *args[0], *node, "--main_process_port", str(port), *args[1]]
            out = open(self.root / f"{name}_machine{rank}.log", "w")
            p = subprocess.Popen(cmd, cwd=d, env={**self.env, "TMPDIR": str(d / "tmp")}, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            p.log = Path(out.name)
            self.procs.append(p)
            started.append(p)
        return started

    @staticmethod
    def wait(procs, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                Machines.kill(p)
                raise AssertionError(f"{p.args} still running after {timeout:.0f} s:\n" + p.log.read_text()[-3000:])
        return [p.log.read_text() for p in procs]

    @staticmethod
    def kill(p) -> None:
        """SIGKILL to one machine's processes: the launcher and torchrun's workers (in sessions of their own)."""
        import psutil

        try:
            tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for q in tree:
            try:
                q.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        p.wait()

    def close(self) -> None:
        """Whatever this test started is gone, orphaned workers included (marked by their environment)."""
        import psutil

        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
        for q in psutil.process_iter():
            try:
                if q.environ().get("KREA2_TEST_MACHINES") == str(self.root):
                    q.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


@pytest.fixture
def machines(tmp_path):
    m = Machines(tmp_path)
    yield m
    m.close()


def _config(tmp_path, tiny, data) -> Path:
    cfg = tmp_path / "shared" / "multinode.yaml"  # run folder, cache and config: on the shared storage
    cfg.parent.mkdir()
    cfg.write_text(textwrap.dedent(f"""\
        model: {{transformer: {tiny}/transformer_raw.safetensors, turbo: {tiny}/transformer_turbo.safetensors,
                text_encoder: {tiny}/text_encoder, vae: {tiny}/vae, dtype: float32}}
        data:
          datasets: [{{path: {data}, trigger_word: k2demo}}]
          num_workers: 0
        lora: {{rank: 4, dropout: 0.1}}
        train:
          mixed_precision: "no"
          stages: [{{resolution: 128, steps: {STEPS}, batch_size: 1}}]
        optimizer: {{lr: 2.0e-3}}
        checkpoint: {{every_steps: 2}}
        logging: {{progress: none, tensorboard: false}}
        export: {{formats: [comfyui], verify: true}}
        output_dir: {tmp_path / 'shared' / 'runs'}
        cache_dir: {tmp_path / 'shared' / 'cache'}
        run_name: ddp
        """))
    return cfg


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_machines_cache_train_kill_resume_export(tiny_dir, demo_images, tmp_path, machines):
    cfg = _config(tmp_path, tiny_dir, demo_images)
    runs = tmp_path / "shared" / "runs"
    cli = ["-m", "krea2_train.cli", str(cfg)]
    ddp = [["--config_file", str(CONFIGS / "multinode_ddp.yaml"), "--num_processes", "4"], cli]

    # ---- DDP on two machines; machine 1 killed (SIGKILL to all its processes) after the step-2 checkpoint
    m0, m1 = machines.launch("ddp", ddp)
    ckpt = runs / "ddp" / "checkpoints" / "step-000002" / "state.json"
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert m0.poll() is None and m1.poll() is None, m0.log.read_text()[-3000:] + m1.log.read_text()[-3000:]
        assert time.monotonic() < deadline, m0.log.read_text()[-3000:]
        time.sleep(0.05)
    machines.kill(m1)
    killed = time.monotonic()
    log0 = machines.wait([m0], timeout=90)[0]
    took = time.monotonic() - killed
    print(f"survivors exited {took:.1f} s after machine 1 was killed")
    assert m0.returncode != 0
    assert took < PEER_TIMEOUT + 30, took
    assert "lost rank 2 on machine 1" in log0 or "lost rank 3 on machine 1" in log0, log0[-3000:]
    assert not (runs / "ddp" / "train_done.json").exists()  # it really stopped mid-run
    # caching was split over the 4 processes of both machines (5 captions, 4 images: rank 0 took 2 and 1)
    assert "text cache: 5 of 5 captions to encode (2 on this process)" in log0, log0[-3000:]
    assert "latent cache: 4 of 4 image crops to encode (1 on this process)" in log0
    # ---- relaunch both machines, node-local scratch wiped: resumes from the last checkpoint and finishes
    last = sorted(p.name for p in (runs / "ddp" / "checkpoints").glob("step-*"))[-1]
    logs = machines.wait(machines.launch("ddp_resumed", ddp, fresh_scratch=True), timeout=300)
    assert all(p.returncode == 0 for p in machines.procs[-2:]), logs[0][-3000:] + logs[1][-3000:]
    assert f"from {last}" in logs[0], logs[0][-3000:]
    assert "lost rank" not in logs[0] + logs[1]

    # ---- FSDP over the same two machines, the same cache (shared: nothing to encode)
    fsdp = [["--config_file", str(CONFIGS / "multinode_fsdp.yaml"), "--num_processes", "4"], cli + ["run_name=fsdp"]]
    logs_fsdp = machines.wait(machines.launch("fsdp", fsdp), timeout=300)
    assert all(p.returncode == 0 for p in machines.procs[-2:]), logs_fsdp[0][-3000:] + logs_fsdp[1][-3000:]
    assert "cache: up to date" in logs_fsdp[0]

    # ---- the reference: one machine, 4 processes, both runs
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE)
    two_machine_ckpt = runs / "ddp" / "checkpoints" / f"step-{STEPS:06d}"
    ref = [["--config_file", str(CONFIGS / "cpu_ddp.yaml"), "--num_processes", "4"],
           [str(script), str(cfg), str(two_machine_ckpt)]]
    (log_ref,) = machines.wait(machines.launch("reference", ref, machines=(0,)), timeout=300)
    assert machines.procs[-1].returncode == 0, log_ref[-3000:]

    # only global rank 0 (machine 0) writes and reports; machine 1's rank 2 is a local main process but says nothing
    for log in (logs[1], logs_fsdp[1]):
        assert "==>" not in log and "checkpoint saved" not in log, log[-3000:]
    assert logs[0].count("==> export") >= 1 and "verify: every exported file" in logs[0]
    for name in ("ddp", "fsdp"):
        run = runs / name
        rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows == list(range(1, STEPS + 1)), rows  # one writer, and the killed run's rows past step 2 dropped
        assert (run / "export" / f"{name}_comfyui.safetensors").exists()
        assert json.loads((run / "export" / "verify.json").read_text())
        assert (run / "index.html").exists()
        info = json.loads((run / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text())
        assert info["machines"] == 2 and info["num_processes"] == 4
    # nothing in a machine's own folder: scratch holds nothing the run needs, rank 2 wrote nothing locally
    assert [p.name for p in machines.node_dir(1).iterdir()] == ["tmp"]

    # the adapters equal the one-machine runs' (same seed, global batch and ranks; DDP also across the kill)
    for name in ("ddp", "fsdp"):
        a, b = _adapter(runs / name), _adapter(runs / f"ref_{name}")
        assert a.keys() == b.keys() and a
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"{name}: two machines vs one, max adapter difference {diff:.3g}")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(runs / "ddp").items() if "lora_B" in k)


def test_checkpoint_from_other_machine_count_refused(tmp_path):
    from krea2_train.errors import UserError
    from krea2_train.train.checkpoint import check_checkpoint_kind

    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "num_processes": 4, "machines": 2}))
    (ckpt / "optimizer.safetensors").write_bytes(b"")
    check_checkpoint_kind(ckpt, False, 4, machines=2)
    with pytest.raises(UserError, match=r"step-000004 was written on 2 machine\(s\) \(4 processes\); this launch "
                                        r"has 1 machine\(s\) \(4 processes\)\. Resume it on 2 machine"):
        check_checkpoint_kind(ckpt, False, 4, machines=1)
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "num_processes": 2}))  # older: one machine
    with pytest.raises(UserError, match="README: Multi-node"):
        check_checkpoint_kind(ckpt, False, 4, machines=2)


def test_base_loads_one_process_per_machine_at_a_time():
    from krea2_train.train.strategy import load_in_turns

    events = []

    class Acc:  # local rank 1 of a machine with 2 processes (global rank 3 of 4)
        num_processes, local_process_index = 4, 1

        def wait_for_everyone(self):
            events.append("barrier")

    assert load_in_turns(Acc(), lambda: events.append("load") or "model", local_processes=2) == "model"
    assert events == ["barrier", "load", "barrier"]  # waits for local rank 0's turn, then loads: 2 turns, not 4


def test_peer_watch_names_a_silent_process(monkeypatch):
    """The heartbeat path (a peer frozen or cut off, where NCCL would just wait): rank 1 stops beating without
    exiting; rank 0's watch names it within its timeout. The kill -9 path is the launched test above."""
    import atexit
    from datetime import timedelta

    from torch.distributed import TCPStore

    from krea2_train.runtime.distributed import PeerWatch

    port = _free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # start() chains its own; restored after
    found = []
    watches = [PeerWatch(r, 2, "127.0.0.1", port, timeout=1.0) for r in (0, 1)]
    w0, w1 = watches
    w0._die = lambda lost, why: (found.append((lost, why, time.monotonic())), w0.stop.set())
    try:
        for w in watches:
            w.start()
        time.sleep(0.6)
        assert not found  # both alive
        w1.stop.set()  # rank 1 goes silent (no "exited" mark: not a normal end)
        silent = time.monotonic()
        w0.thread.join(timeout=5)
        assert found and found[0][0] == [1], found
        assert found[0][2] - silent < 1.0 + 3 * w0.interval, found
        assert "lost rank 1 on machine 0 (" in w0.message(found[0][0], found[0][1])
        assert "no heartbeat for 1 s" in found[0][1]
    finally:
        for w in watches:
            w.stop.set()
            atexit.unregister(w._on_exit)
        del server
