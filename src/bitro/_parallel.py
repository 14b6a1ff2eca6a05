"""Run independent tasks serially, on local processes, or on a dask.distributed client.

Results come back in task order whatever the backend, so serial and distributed runs agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from bitro._settings import settings

if TYPE_CHECKING:
    from dask.distributed import Client


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
        The tasks.
    client
        A :class:`dask.distributed.Client`; when given the tasks run on its workers.
    n_jobs
        Local processes when no client is given; ``None`` uses ``bitro.settings.n_jobs``. 1 runs serially.
    desc
        Label of the progress bar.
    """
    n_jobs = settings.n_jobs if n_jobs is None else n_jobs
    if client is not None:
        from dask.distributed import as_completed

        futures = client.map(func, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not settings.progress):
            results[index[future.key]] = future.result()
        return results
    if n_jobs > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n_jobs) as pool:
            return list(tqdm(pool.map(func, tasks), total=len(tasks), desc=desc, disable=not settings.progress))
    return [func(t) for t in tqdm(tasks, desc=desc, disable=not settings.progress)]
