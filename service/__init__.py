"""The jaxbench model server: a Quart app served by hypercorn (`python -m service`).

Wire-compatible with the predecessor's routes (/generate, /warmup, /pooled, /health), plus
/benchmark (for the Vast PyWorker) and /validate. See app.py for the routes, jobs.py for the job
lifecycle and config.py for the environment.
"""
