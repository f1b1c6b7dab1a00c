"""Dreaming: the model writes its own curricula (dreams) about a context, scores them by
fine-tuning one isolated adapter per dream, all at once, and learns to dream better.

config (DreamConfig), tau (the downstream measure: closed-book questions with candidates),
inner (per-dream adapters fine-tuned vmapped, tau scored on each), select (gradient importance,
top-k plus b random, verbatim-copy share), reward (contrastive log-prob gain over the null
dream; SEAL's binary option), iteration (generate, select, inner loop, reward, GRPO update of
the generator adapter as one jitted pure function).

Layer 2 (the method's parts): imports data/, models/, sampling, train/, grow/, rl/; never the
sleep pipeline or the commands.
"""
