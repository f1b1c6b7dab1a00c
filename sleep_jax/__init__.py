"""sleep_jax: language models that sleep (Knowledge Seeding and Dreaming, arXiv 2606.03979)."""

__version__ = "0.1.0"
