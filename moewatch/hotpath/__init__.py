"""The hot path: what runs on every gate call, and nothing else.

Each gate call is one registered op (``ops``): Dynamo sees one opaque node, CUDA graphs capture
one kernel, and no Python lock, thread-local or value-dependent branch sits in traced code.

- ``layout``       the accumulators every backend adds into and every reader reads
- ``reference``    the readable torch implementation: the oracle, and the fallback
- ``staged``       CPU: the forward stages the call, the reader reduces calls in batches
- ``arena``        CPU: reusable mapped slots for copies of prefill-sized staged calls
- ``numpy_backend`` the CPU reader's reduction: the reference's statistics in numpy, many gates a pass
- ``numba_backend`` the same reduction's common case (the router's own ids) in one compiled pass
- ``device``       other devices: statistics added on the device, windows cut at forward ends
- ``triton_backend`` CUDA: one Triton kernel per call (tested on CPU with ``TRITON_INTERPRET=1``)
- ``ops``          the ``torch.library`` ops and what the hooks call
- ``banks``        one monitor's banks (one per device) and the windows cut from them
- ``requests``     the requests an engine names behind a forward, counted per window
- ``gathered``     decisions an engine gathered across data-parallel ranks: this rank's rows
- ``serial``       the reader's tensor ops on its own thread alone (no OpenMP team of its own)
"""
