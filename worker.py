"""Vast.ai's PyWorker bootstrap runs `python3 -m worker` at the root of the PYWORKER_REPO clone."""

from pyworker.worker import main

if __name__ == "__main__":
    main()
