"""`jaxbench remote search`: one search on a Vast.ai Serverless endpoint, spread over its workers.

The client is the search's coordinator; Vast's autoscaler picks a worker for each request and the
workers run `/generate` (the model server behind the PyWorker). Rooms:

* search.py: what the search asks for, checked before anything is sent;
* plan.py: which nonces each request gets (parts that shrink as the work does, backups at the
  end), what is done, what was printed, what is missing; no network;
* stream.py: what one request's lines may be, checked line by line (a lost, repeated or foreign
  line breaks the stream; its step is run again elsewhere);
* runner.py: the requests in flight, their outcomes, the summary;
* workers.py: what the client knows of each worker: its speed, its failures, whether to avoid it;
* vast.py: the vastai SDK (the key, the certificate, the endpoint, routing, the stream);
* cli.py: the `remote` command line.

Output: the workers' result lines on stdout as they arrive, each nonce once (their counts are those
of the request that sent them), then one summary line; a progress bar and a one-line summary on
stderr. README.md ("Calling the endpoint") and docs/output.md describe them.
"""

from .cli import add_parser, run

__all__ = ["add_parser", "run"]
