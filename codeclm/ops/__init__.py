"""Running a process well: interruption and cancellation, child processes tied to ours, the batch task runner,
Prefect's temporary server, Dask, progress and artifacts, refresh versions."""
