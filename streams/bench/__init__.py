"""Development tooling, not in the wheel: it runs from a source checkout.

The benchmarks (`pinfresh bench ...`), the demo, the read API's load
generator and a test file server, beside the sample catalogs they use.
"""
