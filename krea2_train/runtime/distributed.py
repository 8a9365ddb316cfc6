"""The process group across processes and machines, and what happens when one of them dies.

    state = process_state()          # accelerate's PartialState with the collective timeout set; starts the peer watch
    node_layout()                    # (machines, processes per machine) of this launch

Under `accelerate launch` on several machines a collective waits for every process. A machine that dies (kill -9,
power, network) would leave the others blocked in their next all-reduce until the collective timeout (NCCL: 10 min,
gloo: 30 min by default), with an error naming no one. So each process runs a small heartbeat thread on the launch's
rendezvous store (MASTER_ADDR:MASTER_PORT, which torchrun's agent on machine 0 hosts): it counts up its own key and
watches everyone else's. A process whose count has not moved for KREA2_PEER_TIMEOUT seconds (default 120) is lost:
each survivor prints which rank and machine, and exits at once (it cannot finish a collective without it). A
collective that fails first (gloo sees the closed socket within a second) waits only a few heartbeats for the verdict,
so the message names the lost rank either way. Nothing is saved on that path: the run resumes from its last
checkpoint when every machine is started again with its same command.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from datetime import timedelta

PEER_TIMEOUT_ENV = "KREA2_PEER_TIMEOUT"          # seconds without a heartbeat before a process counts as lost
COLLECTIVE_TIMEOUT_ENV = "KREA2_COLLECTIVE_TIMEOUT"  # seconds one collective may wait (a live but stuck peer)
PEER_LOST_EXIT = 75  # the exit status of a survivor (EX_TEMPFAIL: relaunching resumes)
_PREFIX = "krea2/peers/"
_watch = None


def peer_timeout() -> float:
    return float(os.environ.get(PEER_TIMEOUT_ENV, "120"))


def collective_timeout() -> timedelta:
    # long: the main process exports and verifies (minutes at full size) while the others wait in a barrier; a dead
    # machine is found by the heartbeat long before this
    return timedelta(seconds=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, "7200")))


def node_layout() -> tuple[int, int]:
    """(machines, processes per machine): torchrun's GROUP_WORLD_SIZE and LOCAL_WORLD_SIZE (1, 1 unlaunched)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    machines = int(os.environ.get("GROUP_WORLD_SIZE", max(1, world // max(1, local))))
    return machines, local


def machine_rank() -> int:
    return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))


def process_state(cpu: bool | None = None):
    """accelerate's PartialState (the process group on first use) with the collective timeout set, and the peer
    watch started when there are several processes. On a machine without a GPU it is forced to CPU (gloo), or
    `accelerate launch` with 2 processes gives 2 independent single-process runs."""
    import torch
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=collective_timeout()) if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else PartialState(cpu=cpu)
    start_peer_watch()
    return state


def start_peer_watch() -> None:
    """Start the heartbeat thread once per process (a no-op without a launcher's rendezvous store)."""
    global _watch
    if _watch is not None or int(os.environ.get("WORLD_SIZE", "1")) < 2 or "MASTER_ADDR" not in os.environ:
        return
    _watch = PeerWatch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
                       int(os.environ["MASTER_PORT"]), peer_timeout())
    _watch.start()


class PeerWatch:
    def __init__(self, rank: int, world: int, host: str, port: int, timeout: float):
        self.rank, self.world, self.host, self.port, self.timeout = rank, world, host, port, timeout
        self.interval = max(0.2, min(5.0, timeout / 10))
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # keys of a relaunch never mix with the last
        self.store = None
        self.exiting = False
        self.stop = threading.Event()
        self.thread = None
        self.lock = threading.Lock()  # the watch thread and the main thread (excepthook, exit) share the store
        self.dying = threading.Lock()

    def _key(self, what: str, rank: int) -> str:
        return f"{_PREFIX}{self.run_id}/{what}/{rank}"

    def start(self) -> None:
        from torch.distributed import TCPStore

        # a connection of our own: the process group's store is not used from two threads
        self.store = TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=max(5.0, 2 * self.interval)))
        self.store.set(self._key("where", self.rank), f"machine {machine_rank()} ({socket.gethostname()}, pid "
                       f"{os.getpid()})")
        self.store.add(self._key("beat", self.rank), 1)
        atexit.register(self._on_exit)
        previous = sys.excepthook

        def excepthook(kind, exc, tb):
            # a collective failed (gloo: a peer's socket closed): say which process was lost, if one was
            if issubclass(kind, (RuntimeError, OSError)):
                lost = self.lost_now()
                if lost:
                    self._die(lost, f"a collective failed ({kind.__name__}: {str(exc).splitlines()[0][:200]})")
            previous(kind, exc, tb)

        sys.excepthook = excepthook
        self.thread = threading.Thread(target=self._loop, name="krea2-peer-watch", daemon=True)
        self.thread.start()

    def _on_exit(self) -> None:
        """A process that ends normally says so (it is not reported lost by those still finishing), and the thread
        stops before the interpreter does: a daemon thread ended inside a store call aborts the process."""
        self.exiting = True
        self.stop.set()
        self.thread.join(timeout=self.timeout)
        try:
            with self.lock:
                self.store.set(self._key("exited", self.rank), "1")
        except Exception:
            pass
        self.store = None

    def _counts(self) -> dict[int, int]:
        with self.lock:
            return {r: self.store.add(self._key("beat", r), 0) for r in range(self.world) if r != self.rank}

    def _exited(self, r: int) -> bool:
        with self.lock:
            return self.store.check([self._key("exited", r)])

    def _loop(self) -> None:
        last, seen, exited = {}, {}, {}
        unreachable_since = None
        while not self.stop.wait(self.interval):
            now = time.monotonic()
            try:
                with self.lock:
                    self.store.add(self._key("beat", self.rank), 1)
                for r, n in self._counts().items():
                    if last.get(r) != n:
                        last[r], seen[r] = n, now
                for r in seen:
                    if r not in exited and self._exited(r):
                        exited[r] = now
                unreachable_since = None
            except Exception as exc:  # the store lives on machine 0: it went with it
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.timeout and not self.exiting:
                    self._die(None, f"the rendezvous store {self.host}:{self.port} (hosted on machine 0) stopped "
                              f"answering ({type(exc).__name__})")
                continue
            lost = [r for r, t in seen.items() if now - t > self.timeout and r not in exited]
            if lost and not self.exiting:
                self._die(lost, f"no heartbeat for {self.timeout:g} s")
            # a process that ended while this one still works (an error on that process only, its own log says
            # which): at a normal end every process leaves within seconds of the last barrier
            early = [r for r, t in exited.items() if now - t > self.timeout]
            if early and not self.exiting:
                self._die(early, f"it exited {self.timeout:g} s ago while this process still waits for it")

    def lost_now(self) -> list[int]:
        """The peers whose heartbeat does not move over the next few intervals (live ones keep beating even while
        they wait in a failed collective). [None]: the store itself is gone."""
        try:
            before = self._counts()
            time.sleep(3 * self.interval)
            after = self._counts()
        except Exception:
            return [None]
        return [r for r in before if after[r] == before[r] and not self._exited(r)]

    def _where(self, r: int) -> str:
        try:
            with self.lock:
                return self.store.get(self._key("where", r)).decode()
        except Exception:
            return "machine unknown"

    def message(self, lost, why: str) -> str:
        if lost is None or lost == [None]:
            what = "lost machine 0 (rank 0 and its machine's other ranks)"
        else:
            what = "lost " + ", ".join(f"rank {r} on {self._where(r)}" for r in lost)
        return (f"krea2-train: rank {self.rank} on machine {machine_rank()}: {what}: {why}. Stopping this process "
                "(a collective cannot complete without it). Nothing was saved since the last checkpoint: start "
                "every machine again with its same command to resume from it.")

    def _die(self, lost, why: str) -> None:
        self.dying.acquire()  # once: the watch thread and the excepthook may both get here
        print(self.message(lost, why), file=sys.stderr, flush=True)
        os._exit(PEER_LOST_EXIT)
