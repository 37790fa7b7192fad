"""Entry point of a worker process: ``python -m mailappliance.worker_main`` (started by the supervisor)."""

from mailappliance.workers import worker_main

if __name__ == "__main__":
    worker_main()
