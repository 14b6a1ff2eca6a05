"""Run independent tasks serially, on local processes, or on a dask.distributed client.

Results come back in task order whatever the backend, so serial and distributed runs agree.

Tasks are taken from the sequence one at a time, only when a worker is about to need one: at most
``IN_FLIGHT_PER_WORKER`` tasks per worker are submitted and not yet finished. For a lazy sequence
(:class:`bitro.pp._tiles.TileReads`, whose items are tile windows read on indexing) this keeps the
memory of a parallel run bounded by a few tiles per worker, whatever the size of the slide;
submitting every task at once would read and pickle the whole slide before the first result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from bitro._settings import settings

if TYPE_CHECKING:
    from dask.distributed import Client

#: Tasks submitted ahead per worker (one running, one queued so the worker never waits for the next read).
IN_FLIGHT_PER_WORKER = 2


def _dask_workers(client: Client) -> int:
    """Threads of all workers of a dask client (at least 1)."""
    try:
        return max(sum(client.nthreads().values()), 1)
    except Exception:  # noqa: BLE001 - a client that cannot report its workers still runs tasks
        return 1


def map_tasks(
    func: Callable[..., Any],
    tasks: Sequence[Any],
    *,
    client: Client | None = None,
    n_jobs: int | None = None,
    desc: str = "tasks",
) -> list[Any]:
    """Apply ``func`` to every task and return the results in task order.

    Parameters
    ----------
    func
        A picklable function of one task (a module-level function or :func:`functools.partial`).
    tasks
        The tasks, indexed one at a time (``tasks[i]``) just before task ``i`` is submitted, so a lazy
        sequence is materialised a few items at a time.
    client
        A :class:`dask.distributed.Client`; when given the tasks run on its workers.
    n_jobs
        Local processes when no client is given; ``None`` uses ``bitro.settings.n_jobs``. 1 runs serially.
    desc
        Label of the progress bar.

    Returns
    -------
    ``[func(tasks[0]), func(tasks[1]), ...]``.
    """
    n_jobs = settings.n_jobs if n_jobs is None else n_jobs
    n = len(tasks)
    if client is not None:
        return _map_dask(func, tasks, client, desc)
    if n_jobs > 1 and n > 1:
        return _map_processes(func, tasks, n_jobs, desc)
    return [func(tasks[i]) for i in tqdm(range(n), desc=desc, disable=not settings.progress)]


def _map_processes(func: Callable[..., Any], tasks: Sequence[Any], n_jobs: int, desc: str) -> list[Any]:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    n = len(tasks)
    results: list[Any] = [None] * n
    limit = IN_FLIGHT_PER_WORKER * n_jobs
    with (
        ProcessPoolExecutor(max_workers=min(n_jobs, n)) as pool,
        tqdm(total=n, desc=desc, disable=not settings.progress) as bar,
    ):
        pending: dict[Any, int] = {}
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < limit:
                pending[pool.submit(func, tasks[nxt])] = nxt
                nxt += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                results[pending.pop(future)] = future.result()
                bar.update()
    return results


def _map_dask(func: Callable[..., Any], tasks: Sequence[Any], client: Client, desc: str) -> list[Any]:
    from dask.distributed import as_completed

    n = len(tasks)
    results: list[Any] = [None] * n
    limit = IN_FLIGHT_PER_WORKER * _dask_workers(client)
    index: dict[str, int] = {}

    def submit(i: int):
        # the task's data goes to the cluster as its own piece (not inlined in the task's graph)
        [data] = client.scatter([tasks[i]], hash=False)  # a list of one: the task is not split into its parts
        future = client.submit(func, data, pure=False)
        index[future.key] = i
        return future, data

    scattered: dict[str, Any] = {}
    first = []
    nxt = 0
    while nxt < min(limit, n):
        future, data = submit(nxt)
        scattered[future.key] = data
        first.append(future)
        nxt += 1
    queue = as_completed(first)
    with tqdm(total=n, desc=desc, disable=not settings.progress) as bar:
        for future in queue:
            results[index.pop(future.key)] = future.result()
            scattered.pop(future.key).release()
            future.release()
            bar.update()
            if nxt < n:
                new, data = submit(nxt)
                scattered[new.key] = data
                queue.add(new)
                nxt += 1
    return results
