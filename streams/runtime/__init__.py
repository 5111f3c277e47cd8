"""Production runtime around the streaming core (shipped in the wheel).

The embedded stack launcher and the Milvus server wrapper, worker processes
and their pool, logging, the status view, catalogs, and the encoder's
training and evaluation jobs.
"""
