"""Reference cluster agent: the HTTP service one serving cluster runs to receive layout changes.

- :mod:`agent.state`: wire format, validation, versions, the desired/actual state and its file;
- :mod:`agent.rollout`: instances and the staggered waves that reach a desired layout (pure);
- :mod:`agent.runner`: the apply loop that runs announced waves on a backend;
- :mod:`agent.backends`: ``simulated`` (an in-process twin) and ``nvml`` (local GPUs);
- :mod:`agent.twin`: GPU telemetry the simulated backend writes for the ingest DAG;
- :mod:`agent.app`: the FastAPI routes; :mod:`agent.server`: uvicorn and ``wattplan agent``.
"""
