"""The Vast.ai PyWorker configuration of the jaxbench model server (see worker.py)."""
