"""Benchmarks beside the harness: defense latency and the attack's gradient cost (`latency.py`), the students'
fidelity to their teacher (`fidelity.py`, `python -m eval compare`) and clean purified accuracy (`accuracy.py`)."""
