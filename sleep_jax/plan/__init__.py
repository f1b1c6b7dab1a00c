"""Mesh plans: every step compiled for a real TPU topology from this CPU host, nothing allocated.

``chips`` holds the published per-chip figures, ``hlo`` reads collectives and loops from the
compiled HLO text, ``steps`` builds and compiles the train, seeding, grow, decode and GRPO steps
on abstract sharded inputs, ``cli`` is ``sleep-jax plan``.
"""
