"""Reference cluster agent: the HTTP service one serving cluster runs to receive layout changes.

The layout rules (validating a change set, applying target counts, counting GPUs) live as pure
functions in :mod:`agent.state`; :mod:`agent.app` is a thin FastAPI layer over them and
:mod:`agent.server` runs it under uvicorn.
"""
