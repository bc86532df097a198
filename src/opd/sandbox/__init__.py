"""Running programs a model wrote, where they can do no harm: their own process, no network, a fresh writable
directory and nothing else writable, a scrubbed environment, resource limits and a wall-clock deadline
(docs/sandbox.md). ``Sandbox`` runs them; ``tests`` turns a row's tests into the programs that check a completion."""
