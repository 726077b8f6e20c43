"""Executors: where the work units of a sweep run.

``local`` (the default) runs them one after the other in this process. ``ray`` hands them to
a Ray cluster: one actor per worker slot (one per GPU with ``num_gpus=1`` when the cluster has
GPUs, else one per CPU) builds a :class:`~steamviz.run.runner.Runner` once (the model, anchors,
reference bank, reference texts...) and runs units; this process sends the units out and
writes the rows that come back to the run's results store. Both executors plan the same
units with the same keys and write the same store, so a sweep started locally can be
finished on Ray and the other way round::

    steamviz sweep configs/smoke.yaml --out runs/smoke --executor ray                 # local Ray
    steamviz sweep configs/smoke.yaml --out runs/smoke --executor ray --address auto  # this node's cluster
    steamviz sweep configs/smoke.yaml --out runs/smoke --executor ray --address ray://head:10001

>>> df = run_sweep(cfg, "runs/smoke", executor="ray", address="auto", workers=8)  # doctest: +SKIP

Without ``address``, Ray's own rules apply: the instance this process already joined, else
``$RAY_ADDRESS``, else the one ``ray start`` last started on this machine, else a new private
one. The workers import steamviz and load ``cfg.model`` themselves: install the same steamviz
(and model files, data) on every node.

Failures: a worker that dies (killed, out of memory, node lost) loses only the unit it was
running; that unit goes back into the queue and a fresh actor takes the dead one's place (at
most ``max_retries`` times per unit; an error raised by the unit's own code stops the sweep,
as it does locally). Only this process writes the store, one atomically written file per point
named by the point's key, so the store never holds a point twice.

Ray is an optional extra, ``pip install 'steamviz[ray]'``: nothing imports it unless the ray
executor is asked for.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from collections import Counter, deque

EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'steamviz[ray]'"


class ExecutorError(RuntimeError):
    """An executor that cannot run: unknown name, bad option, Ray missing or unreachable."""


def import_ray():
    """The ``ray`` module, or an :class:`ExecutorError` telling how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"the ray executor needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def plan(runner) -> list[tuple[list[str], list, dict]]:
    """Every work unit of the runner's sweep with its store keys: ``(keys, requests, point)``."""
    from .plan import grid, units

    reqs = runner.requests()
    return [([runner.keys(r, p, batch) for r in batch], batch, p)
            for batch, p in units(reqs, grid(runner.cfg, runner.hp.block))]


def make_executor(name: str, cfg, lm=None, log=print, vstar_dir=None, **options):
    """An executor by name. ``lm``: the local executor's model (Ray workers load ``cfg.model``
    themselves). ``vstar_dir``: the runners' saved target vectors (:class:`~steamviz.run.
    runner.Runner`). ``options`` (``None`` values are ignored) go to :class:`RayExecutor`."""
    options = {k: v for k, v in options.items() if v is not None}
    name = str(name).lower()
    if name == "local":
        if options:
            raise ExecutorError(f"options {sorted(options)} need --executor ray")
        return LocalExecutor(cfg, lm, vstar_dir)
    if name == "ray":
        return RayExecutor(cfg, log=log, vstar_dir=vstar_dir, **options)
    raise ExecutorError(f"unknown executor {name!r}; choose one of {list(EXECUTORS)}")


class LocalExecutor:
    """Runs the units one after the other in this process."""

    def __init__(self, cfg, lm=None, vstar_dir=None):
        self.cfg, self.lm, self.runner, self.vstar_dir = cfg, lm, None, vstar_dir

    def plan(self) -> list:
        from .runner import Runner

        self.runner = Runner(self.cfg, self.lm, self.vstar_dir)
        return plan(self.runner)

    def run(self, work: list, done) -> None:
        for keys, batch, point in work:
            done(keys, batch, point, self.runner.run_unit(batch, point))

    def close(self) -> None:
        pass


class SweepWorker:
    """The body of one Ray actor: a Runner (the model loaded once) that runs work units."""

    def __init__(self, cfg, vstar_dir=None):
        from .runner import Runner

        self.runner = Runner(cfg, vstar_dir=vstar_dir)

    def info(self) -> dict:
        return dict(pid=os.getpid(), host=socket.gethostname(), device=str(self.runner.lm.device))

    def plan(self) -> list:
        return plan(self.runner)

    def run_unit(self, batch: list, point: dict) -> list[dict]:
        return self.runner.run_unit(batch, point)


class RayExecutor:
    """Runs the units on Ray actors (see the module docstring).

    ``address``: ``None`` (a local Ray instance), ``"auto"`` (the cluster this machine is a
    node of), ``"HOST:PORT"`` or ``"ray://HOST:10001"``. ``workers``: how many actors (default:
    one per GPU of the cluster, or one per ``cpus_per_worker`` CPUs when it has none; each holds
    a copy of the model). A GPU worker sees only its own GPU: keep ``cfg.device`` "auto" or
    "cuda" ("cpu" reserves no GPU). ``init_kwargs`` go to ``ray.init``.
    """

    def __init__(self, cfg, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: int = 1, max_retries: int = 3, log=print,
                 init_kwargs: dict | None = None, vstar_dir=None):
        for name, v, least in (("workers", workers, 1), ("cpus_per_worker", cpus_per_worker, 1),
                               ("max_retries", max_retries, 0)):
            if v is not None and (not isinstance(v, int) or v < least):
                raise ExecutorError(f"{name} must be an integer >= {least} (got {v!r})")
        self.ray = import_ray()
        self.cfg, self.address, self.workers = cfg, address, workers
        self.cpus, self.max_retries, self.log = cpus_per_worker, max_retries, log
        self.init_kwargs = dict(init_kwargs or {})
        # each worker saves and reads target vectors there (absolute: a worker's working
        # directory is not this process's; on a cluster of several machines, each its own)
        self.vstar_dir = None if vstar_dir is None else str(Path(vstar_dir).resolve())
        self.actors: list = []
        self._own_ray = False

    def _connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kw = dict(self.init_kwargs)
            if self.address is None:  # a local instance needs no dashboard
                kw.setdefault("include_dashboard", False)
            try:
                ray.init(address=self.address, **kw)
            except Exception as e:  # Ray raises bare Exceptions when its processes fail to start
                if self.address is None:
                    raise ExecutorError(
                        f"could not start a local Ray instance: {e}\n(On a busy machine, start one "
                        "with `ray start --head` and pass its address: --address HOST:PORT.)") from e
                raise ExecutorError(f"could not reach Ray at {self.address}: {e}") from e
            self._own_ray = True
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0)) if str(self.cfg.device) != "cpu" else 0
        self.n = self.workers or gpus or max(1, int(res.get("CPU", 1)) // self.cpus)
        self.options = dict(num_cpus=self.cpus, num_gpus=1 if gpus else 0)
        fit = gpus or int(res.get("CPU", 1)) // self.cpus
        if self.n > fit:
            self.log(f"[ray] warning: the cluster holds {fit} worker(s) of {self.options} at once; "
                     f"the other {self.n - fit} wait for resources")
        self._actor = ray.remote(SweepWorker)

    def _new_actor(self):
        return self._actor.options(**self.options).remote(self.cfg, self.vstar_dir)

    def _start(self, n: int) -> None:
        """Start actors until there are ``n`` (each loads the model once); wait until ready."""
        ray = self.ray
        t0 = time.perf_counter()
        new = range(len(self.actors), n)
        if not new:
            return
        where = self.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
        self.log(f"[ray] starting {len(new)} worker(s) ({self.options}) on {where}")
        self.actors += [self._new_actor() for _ in new]
        pending = {self.actors[i].info.remote(): i for i in new}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except self.ray.exceptions.RayError as e:
                raise ExecutorError(f"Ray worker {i} could not start: {e}") from e
            self.log(f"[ray] worker {i} ready: pid={info['pid']} host={info['host']} "
                     f"device={info['device']} ({time.perf_counter() - t0:.1f} s)")

    def plan(self) -> list:
        """Start one worker and plan on it (the keys need the model); :meth:`run` starts the
        others only when there is work for them (a resumed run with nothing left starts one)."""
        self._connect()
        self._start(1)
        return self.ray.get(self.actors[0].plan.remote())

    def run(self, work: list, done) -> None:
        """Keep every worker busy with one unit; ``done(keys, batch, point, rows)`` for each
        unit that comes back. A unit whose worker died goes back into the queue.

        The units of one request go to one worker (the first that takes one of them): a
        worker optimises the target vectors of a request's whole grid together at its first
        ROME / STEAM-ROME point (``Runner.prefetch``) and measures the request's other points
        from that work; another worker would have to repeat it."""
        ray = self.ray
        died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
        todo = deque(range(len(work)))
        running: dict = {}  # ObjectRef -> (worker slot, unit index)
        tries: Counter = Counter()
        owner: dict = {}  # requests of a unit -> the worker slot that has them

        ident = [repr([r.to_dict() for r in batch]) for _, batch, _ in work]
        # one worker per request group at most: a request's units all go to one worker
        self._start(min(self.n, len(set(ident))))
        idle = deque(range(len(self.actors)))

        def take(slot):  # the first unit this worker may run, or None
            for j, u in enumerate(todo):
                if owner.setdefault(ident[u], slot) == slot:
                    del todo[j]
                    return u
            return None

        while todo or running:
            for slot in list(idle):
                u = take(slot)
                if u is None:
                    continue
                idle.remove(slot)
                _, batch, point = work[u]
                running[self.actors[slot].run_unit.remote(batch, point)] = (slot, u)
            if not running:  # every unit left belongs to a worker that is gone: impossible
                raise ExecutorError("no worker can take the units left")
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, u = running.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except died as e:
                tries[u] += 1
                if tries[u] > self.max_retries:
                    raise ExecutorError(f"unit {u} ({work[u][2]}) lost its worker {tries[u]} times; "
                                        f"giving up: {e}") from e
                self.log(f"[ray] worker {slot} died ({type(e).__name__}); its unit goes back in the "
                         f"queue (retry {tries[u]}/{self.max_retries}) and a new worker replaces it")
                ray.kill(self.actors[slot])  # a no-op when it is already dead
                self.actors[slot] = self._new_actor()
                todo.appendleft(u)
                idle.append(slot)
                continue
            idle.append(slot)
            done(*work[u], rows)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self._own_ray:
            self.ray.shutdown()
            self._own_ray = False
